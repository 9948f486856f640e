"""Resident memory of the pretrained backbone's features over images of many working shapes against one shape: at one
pixel scale (``pretrained.geometry: scale``) a category of mixed sizes sends the backbone many input shapes, and the
CPU's convolution library (oneDNN) keeps compiled primitives per shape in a cache (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``,
1024 by default). Prints the process's resident memory every ``--every`` images.

    python benchmarks/shape_memory.py --shapes one --images 200
    python benchmarks/shape_memory.py --shapes many --images 200
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 python benchmarks/shape_memory.py --shapes many --images 200
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def resident_gb() -> float:
    """This process's resident memory now, in GB (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=("one", "many"), required=True,
                        help="one: every image 352 x 352; many: each side a random multiple of 16 from 224 to 464")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--every", type=int, default=50)
    args = parser.parse_args()

    from aead.models.memory_bank import pretrained_memory
    from aead.params import load_params

    memory = pretrained_memory(load_params(REPO / "params.yaml").pretrained).eval()
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(1, args.images + 1):
            h, w = (352, 352) if args.shapes == "one" else (16 * int(rng.integers(14, 30)), 16 * int(rng.integers(14, 30)))
            memory.features(torch.rand(1, 3, h, w))
            if i % args.every == 0 or i == args.images:
                print(f"{i} images: resident {resident_gb():.2f} GB, {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
