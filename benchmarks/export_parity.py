"""How far the exported detectors' scores are from the pipeline's evaluation, on the test images it scored.

Reads the evaluation stage's per-image scores (``plots/evaluate-<map>/scores.csv``: raw image score, normalised score
and verdict of every test image), scores the same image files with each exported format (the ``torch.export`` program
and the ONNX model in ONNX Runtime, both from the original files, resized in their graphs), and prints per format and
detector the largest and median differences and the number of verdicts that differ. Run it after ``dvc repro`` in the
project folder (or a folder laid out like one):

    python benchmarks/export_parity.py
    python benchmarks/export_parity.py --models-root models --batch-size 8

The evaluation computes in the precision ``model.precision`` picks (fp32 on CPUs with ``model.deterministic``); the
exports compute in fp32, ONNX Runtime with its own kernels, so differences are float rounding. scores.csv keeps 6
significant digits, which bounds how small a measured difference can be.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np


def evaluation_scores(path: Path, image_score: str) -> dict[str, list[tuple[str, float, float, bool]]]:
    """Per model/category: (image path, raw score, normalised score, verdict) rows of the evaluation."""
    rows: dict[str, list[tuple[str, float, float, bool]]] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.setdefault(f"{r['model']}/{r['category']}", []).append(
                (r["path"], float(r[image_score]), float(r["normalized"]), r["anomalous"] == "1"))
    return rows


def runners(export_dir: Path, key: str, files: dict[str, str]):
    """(format name, function from a uint8 (N, H, W, 3) batch to (score, raw)) for each exported format."""
    if "pt2" in files:
        import torch

        program = torch.export.load(str(export_dir / files["pt2"])).module()

        def run_pt2(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            with torch.inference_mode():
                score, raw, _ = program(torch.from_numpy(batch))
            return score.numpy(), raw.numpy()

        yield "pt2", run_pt2
    if "onnx" in files:
        from aead.deploy.runtime import OnnxDetector

        detector = OnnxDetector(export_dir, key.split("/", 1)[1], key.split("/", 1)[0])
        yield "onnx", lambda batch: detector(batch)[:2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-root", type=Path, default=Path("models"))
    parser.add_argument("--plots-dir", type=Path, default=Path("plots"))
    parser.add_argument("--batch-size", type=int, default=1,
                        help="images per call; images of one size only are batched (default 1)")
    args = parser.parse_args()
    from aead.data.images import read_image

    export_dir = args.models_root / "export"
    index = json.loads((export_dir / "index.json").read_text())
    expected = evaluation_scores(args.plots_dir / f"evaluate-{index['method']}" / "scores.csv", index["image_score"])
    print(f"exported '{index['method']}' detectors vs the evaluation ({index['image_score']} score), "
          f"batch {args.batch_size}:")
    for key, files in index["files"].items():
        rows = expected[key]
        images = [read_image(p) for p, *_ in rows]
        raw_ref = np.array([r[1] for r in rows])
        norm_ref = np.array([r[2] for r in rows])
        verdict_ref = np.array([r[3] for r in rows])
        threshold = index["operating_points"][key]["raw_threshold"]
        for fmt, run in runners(export_dir, key, files):
            raw, norm = np.empty(len(images)), np.empty(len(images))
            for s in range(0, len(images), args.batch_size):
                chunk = images[s : s + args.batch_size]
                sizes = {im.shape for im in chunk}
                outs = [run(np.stack(chunk))] if len(sizes) == 1 else [run(im[None]) for im in chunk]
                norm[s : s + len(chunk)] = np.concatenate([o[0] for o in outs])
                raw[s : s + len(chunk)] = np.concatenate([o[1] for o in outs])
            d_raw = np.abs(raw - raw_ref) / np.maximum(np.abs(raw_ref), 1e-12)
            d_norm = np.abs(norm - norm_ref)
            flips = int(((raw >= threshold) != verdict_ref).sum())
            print(f"  {key:24s} {fmt:5s} {len(images):4d} images: raw score relative |diff| max {d_raw.max():.2e} "
                  f"median {np.median(d_raw):.2e}; normalised |diff| max {d_norm.max():.2e}; verdicts that differ: "
                  f"{flips}")


if __name__ == "__main__":
    main()
