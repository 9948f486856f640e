"""Elongated images: the pretrained map with the aspect ratio kept (the default) against the images squashed to a
square, through the pipeline's own stages.

The data: strips of a textured surface, 128 x 384 px, each three synthetic ``tile`` images side by side (the
embedded generator, seeded). Training strips are made of good training images; a defective test strip has one
defective tile image (crack, glue strip or oil, with its mask) among two good ones, at a random place. The
"squashed" copy of the same data set has every strip and mask resized to 128 x 128 (what a square-only pipeline
does); the pipeline then scores it at 224 x 224, and the kept one at 224 x 672.

For each copy it runs ``stages/prepare_split.py``, ``stages/build_pretrained_bank.py`` and
``stages/evaluate.py --method pretrained`` with the repository's params.yaml, changed only in ``data.*`` and the
output folders, and prints the headline metrics with their intervals.

    python benchmarks/aspect_ratio.py --work /tmp/aspect      # about 3 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SIDE = 128
STRIP = 3


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def save(path: Path, array: np.ndarray, squash: bool, mask: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if squash:
        img = img.resize((SIDE, SIDE), Image.NEAREST if mask else Image.BILINEAR)
    img.save(path)


def build_strips(source: Path, out: Path, squash: bool, n_good: int, seed: int) -> dict[str, int]:
    """The strip data set (category ``strip``) in MVTec layout under ``out`` from the tile images under ``source``."""
    rng = np.random.default_rng(seed)
    tile = source / "tile"
    train = sorted((tile / "train" / "good").glob("*.png"))
    good = sorted((tile / "test" / "good").glob("*.png"))
    defect_types = sorted(p.name for p in (tile / "test").iterdir() if p.name != "good")
    cat = out / "strip"
    counts = {}
    for i in range(len(train) // STRIP):
        parts = [read(p) for p in train[i * STRIP : (i + 1) * STRIP]]
        save(cat / "train" / "good" / f"{i:03d}.png", np.concatenate(parts, axis=1), squash, False)
    counts["train_good"] = len(train) // STRIP
    fillers = iter(good)
    for i in range(n_good):
        parts = [read(next(fillers)) for _ in range(STRIP)]
        save(cat / "test" / "good" / f"{i:03d}.png", np.concatenate(parts, axis=1), squash, False)
    counts["test_good"] = n_good
    for kind in defect_types:
        images = sorted((tile / "test" / kind).glob("*.png"))
        for i, path in enumerate(images):
            where = int(rng.integers(STRIP))
            mask = read(tile / "ground_truth" / kind / f"{path.stem}_mask.png")
            parts, masks = [], []
            for j in range(STRIP):
                if j == where:
                    parts.append(read(path))
                    masks.append(mask)
                else:
                    parts.append(read(next(fillers)))
                    masks.append(np.zeros_like(mask))
            save(cat / "test" / kind / f"{i:03d}.png", np.concatenate(parts, axis=1), squash, False)
            save(cat / "ground_truth" / kind / f"{i:03d}_mask.png", np.concatenate(masks, axis=1), squash, True)
        counts[kind] = len(images)
    return counts


def run_pipeline(work: Path, name: str, root: Path) -> dict:
    """prepare-split, build-pretrained-bank and evaluate-pretrained on ``root``; the headline metrics."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(root=str(root), categories=["strip"], prepared_dir=str(work / name / "prepared"))
    params_path = work / name / "params.yaml"
    params_path.parent.mkdir(parents=True, exist_ok=True)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    out = work / name
    steps = [
        ["stages/prepare_split.py", "--params", str(params_path), "--metrics-dir", str(out / "metrics"),
         "--plot", str(out / "plots" / "split.csv")],
        ["stages/build_pretrained_bank.py", "--params", str(params_path), "--out", str(out / "models" / "pretrained"),
         "--metrics-dir", str(out / "metrics"), "--plot", str(out / "plots" / "bank.csv")],
        ["stages/evaluate.py", "--method", "pretrained", "--params", str(params_path), "--models-root",
         str(out / "models"), "--metrics-dir", str(out / "metrics"), "--plots-dir", str(out / "plots" / "evaluate"),
         "--calibration", str(out / "models" / "calibration.json")],
    ]
    for step in steps:
        subprocess.run([sys.executable, *step], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    details = json.loads((out / "metrics" / "details" / "evaluate-pretrained.json").read_text())["pretrained"]
    return {key: (details[key], *(details[f"{key}_ci"] or (None, None)))
            for key in ("image_auroc", "pixel_auroc", "aupro")} | {"f1": details["calibrated_f1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (replaced)")
    parser.add_argument("--train-strips", type=int, default=40)
    parser.add_argument("--test-good-strips", type=int, default=60)
    parser.add_argument("--defect-strips", type=int, default=20, help="per defect type (3 types)")
    args = parser.parse_args()
    from aead.data.synthetic import generate_dataset

    if args.work.exists():
        shutil.rmtree(args.work)
    source = args.work / "tiles"
    fillers = args.defect_strips * 3 * (STRIP - 1)
    generate_dataset(source, ["tile"], SIDE, args.train_strips * STRIP, args.test_good_strips * STRIP + fillers,
                     args.defect_strips, seed=7)
    rows = {}
    for name, squash in (("kept", False), ("squashed", True)):
        counts = build_strips(source, args.work / f"data-{name}", squash, args.test_good_strips, seed=0)
        rows[name] = run_pipeline(args.work, name, args.work / f"data-{name}")
        print(name, json.dumps(counts), json.dumps(rows[name]), flush=True)
    print("| strips | image AUROC [95% CI] | pixel AUROC [95% CI] | AUPRO [95% CI] | calibrated F1 |")
    print("|---|---|---|---|---|")
    for name, m in rows.items():
        cells = [f"{m[k][0]:.3f} [{m[k][1]:.3f}, {m[k][2]:.3f}]" for k in ("image_auroc", "pixel_auroc", "aupro")]
        print(f"| {name} | {' | '.join(cells)} | {m['f1']:.3f} |")


if __name__ == "__main__":
    main()
