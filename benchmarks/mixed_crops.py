"""A surface data set of mixed image sizes, like real inspection crops: crops of random height and width (one
camera, one pixel scale, hundreds of distinct sizes and aspect ratios) from an MVTec-layout category, defect masks
carried over. Each defective test crop holds at least ``--min-defect`` of its source image's defect pixels.

    python benchmarks/mixed_crops.py --root ../shared/data/kolektorsdd_256 --category commutator \\
        --out /tmp/mixed/surface        # 729 training, 208 good and 156 defective test crops, 96-256 x 200-420 px

Then ``python benchmarks/real_data.py --root /tmp/mixed --category surface ...`` (docs/measurements.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from aead.data.mvtec import list_images, read_image, read_mask


def random_box(rng: np.random.Generator, height: int, width: int, heights: tuple[int, int],
               widths: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop whose sides are drawn uniformly from ``heights`` and ``widths`` (clipped to the
    image) and whose position is uniform."""
    h = int(rng.integers(min(heights[0], height), min(heights[1], height) + 1))
    w = int(rng.integers(min(widths[0], width), min(widths[1], width) + 1))
    return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w


def save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--category", required=True)
    ap.add_argument("--out", type=Path, required=True, help="the new category folder")
    ap.add_argument("--train-crops", type=int, default=3, help="crops per training image")
    ap.add_argument("--good-crops", type=int, default=2, help="crops per good test image")
    ap.add_argument("--defect-crops", type=int, default=3, help="crops per defective test image")
    ap.add_argument("--heights", type=int, nargs=2, default=(200, 420))
    ap.add_argument("--widths", type=int, nargs=2, default=(96, 256))
    ap.add_argument("--min-defect", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    src, rng = a.root / a.category, np.random.default_rng(a.seed)
    if a.out.exists():
        raise SystemExit(f"{a.out}: exists; give a new folder")
    size = (tuple(a.heights), tuple(a.widths))
    for path in list_images(src / "train" / "good"):
        image = read_image(path)[..., 0]
        for n in range(a.train_crops):
            t, l, h, w = random_box(rng, *image.shape, *size)
            save(image[t:t + h, l:l + w], a.out / "train" / "good" / f"{path.stem}_{n}.png")
    for path in list_images(src / "test" / "good"):
        image = read_image(path)[..., 0]
        for n in range(a.good_crops):
            t, l, h, w = random_box(rng, *image.shape, *size)
            save(image[t:t + h, l:l + w], a.out / "test" / "good" / f"{path.stem}_{n}.png")
    for folder in sorted(p for p in (src / "test").iterdir() if p.is_dir() and p.name != "good"):
        for path in list_images(folder):
            image = read_image(path)[..., 0]
            mask = read_mask(src / "ground_truth" / folder.name / f"{path.stem}_mask.png", image.shape)
            total = int(mask.sum())
            for n in range(a.defect_crops):
                for _ in range(10_000):
                    t, l, h, w = random_box(rng, *image.shape, *size)
                    if mask[t:t + h, l:l + w].sum() >= a.min_defect * total:
                        break
                else:
                    raise SystemExit(f"{path}: no crop holds {a.min_defect:.0%} of its defect")
                save(image[t:t + h, l:l + w], a.out / "test" / folder.name / f"{path.stem}_{n}.png")
                save((mask[t:t + h, l:l + w] * 255).astype(np.uint8),
                     a.out / "ground_truth" / folder.name / f"{path.stem}_{n}_mask.png")


if __name__ == "__main__":
    main()
