"""A surface data set the size of a real inspection set, for timing the pretrained stages: ``--train`` crops of
``--height`` rows from the full width of an MVTec-layout category's good training images (cycled, every second pass
mirrored), and each test image cropped at four offsets. Defect masks are not carried over (the set is for timing).

    python benchmarks/surface_crops.py --root ../shared/data/kolektorsdd_256 --category commutator \\
        --out /tmp/big800/surface          # 800 crops of 400 x 256 px, 416 good and 208 defective test crops

Then the stage scripts on a copy of params.yaml whose data.root, data.categories and data.prepared_dir point at it
(docs/measurements.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from aead.data.mvtec import list_images, read_image

OFFSETS = (0, 80, 160, 240)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--category", required=True)
    ap.add_argument("--out", type=Path, required=True, help="the new category folder")
    ap.add_argument("--train", type=int, default=800)
    ap.add_argument("--height", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    src, rng = a.root / a.category, np.random.default_rng(a.seed)
    train = list_images(src / "train" / "good")
    (a.out / "train" / "good").mkdir(parents=True, exist_ok=True)
    for n in range(a.train):
        image = read_image(train[n % len(train)])[..., 0]
        top = int(rng.integers(0, image.shape[0] - a.height + 1))
        crop = image[top : top + a.height]
        if (n // len(train)) % 2:
            crop = crop[:, ::-1]
        Image.fromarray(np.ascontiguousarray(crop)).save(a.out / "train" / "good" / f"{n:04d}.png")
    for folder in sorted(p for p in (src / "test").iterdir() if p.is_dir()):
        (a.out / "test" / folder.name).mkdir(parents=True, exist_ok=True)
        for path in list_images(folder):
            image = read_image(path)[..., 0]
            for off in OFFSETS:
                crop = np.ascontiguousarray(image[off : off + a.height])
                Image.fromarray(crop).save(a.out / "test" / folder.name / f"{path.stem}_{off}.png")


if __name__ == "__main__":
    main()
