"""Scoring latency of one exported detector in each runtime, side by side in one run: eager PyTorch (the detector
module the export traces), the ``torch.export`` program (``.pt2``) and the ONNX model in ONNX Runtime, at batch 1
and batched, from decoded uint8 images to (score, raw score, map), everything in the graph (resize included).

Rounds interleave the runtimes and batch sizes, so the machine's drift hits all alike; the table gives the median over
rounds of milliseconds per image and images per second. Run it in a project folder after ``dvc repro`` (or in a folder
laid out like one):

    python benchmarks/deploy_latency.py --images ../shared/data/mvtec_transistor_256/transistor/test \\
        --category transistor --batch-sizes 1 8 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from aead.data.images import read_image
from aead.deploy.export import build_detector
from aead.deploy.outputs import expand_inputs
from aead.deploy.predict import recorded_params
from aead.deploy.runtime import OnnxDetector, read_index


def read_folder(folder: Path) -> list[np.ndarray]:
    """The decoded images under ``folder``, as ``aead predict`` finds them."""
    return [read_image(found.path) for found in expand_inputs([folder])]


def same_size(images: list[np.ndarray], count: int) -> np.ndarray:
    """``count`` of ``images`` of the first one's size, as one uint8 (N, H, W, 3) array; repeated where fewer have
    that size."""
    same = [im for im in images if im.shape == images[0].shape][:count]
    if len(same) < count:
        same = (same * (count // len(same) + 1))[:count]
    return np.stack(same)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    parser.add_argument("--category", required=True)
    parser.add_argument("--model", help="default: the first exported for the category")
    parser.add_argument("--models-root", type=Path, default=Path("models"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--count", type=int, default=16, help="images scored per round and batch size")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--spinning", action="store_true",
                        help="let ONNX Runtime's threads spin between calls (they then slow the torch runtimes that "
                             "run next in a round)")
    parser.add_argument("--json", type=Path, help="also write the table's figures here")
    args = parser.parse_args()
    export_dir = args.models_root / "export"
    index = read_index(export_dir)
    onnx = OnnxDetector(export_dir, args.category, args.model, spinning=args.spinning)
    model = onnx.key.split("/", 1)[0]
    params = recorded_params(args.models_root, index["method"])
    eager = build_detector(params, args.models_root, model, args.category, index["method"])
    program = torch.export.load(str(export_dir / index["files"][onnx.key]["pt2"])).module()
    images = same_size(read_folder(args.images), args.count)

    def torch_runner(module: torch.nn.Module):
        def run(batch: np.ndarray) -> None:
            with torch.inference_mode():
                module(torch.from_numpy(batch))
        return run

    runners = {"eager PyTorch": torch_runner(eager), "torch.export (.pt2)": torch_runner(program),
               "ONNX Runtime (.onnx)": lambda batch: onnx(batch)}
    for run in runners.values():  # warm-up: first calls allocate and pick kernels
        run(images[:1])
        run(images[: max(args.batch_sizes)])
    times: dict[tuple[str, int], list[float]] = {(r, b): [] for r in runners for b in args.batch_sizes}
    for _ in range(args.rounds):
        for name, run in runners.items():
            for batch in args.batch_sizes:
                start = time.perf_counter()
                for s in range(0, len(images), batch):
                    run(images[s : s + batch])
                times[(name, batch)].append((time.perf_counter() - start) / len(images))
    map_shape = onnx(images[:1])[2].shape[1:]
    print(f"{model}/{args.category} ({index['method']} map, {images.shape[2]}x{images.shape[1]} images, map "
          f"{'x'.join(map(str, map_shape[::-1]))}), torch {torch.get_num_threads()} threads, median of "
          f"{args.rounds} rounds of {len(images)} images:")
    print("| runtime | " + " | ".join(f"batch {b}: ms/image | images/s" for b in args.batch_sizes) + " |")
    print("|---|" + "---|---|" * len(args.batch_sizes))
    table = {}
    for name in runners:
        cells = []
        for b in args.batch_sizes:
            ms = 1000 * statistics.median(times[(name, b)])
            table[f"{name} batch {b}"] = {"ms_per_image": ms, "images_per_second": 1000 / ms}
            cells += [f"{ms:.1f}", f"{1000 / ms:.1f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
    main()
