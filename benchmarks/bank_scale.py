"""The pretrained bank stage on a simulated large data set: wall time and peak memory against the number of training
images and of processes (issue 31, item 2).

A pool of synthetic defect-free images (``aead.data.synthetic``, category bottle) is turned into as many distinct
training images as the largest run needs (each a pool image shifted by a few pixels and, every other round, mirrored),
written as PNG files with the manifests prepare-split would write. Then, for each number of images and of processes,
the real stage script ``stages/build_pretrained_bank.py`` runs in a fresh process tree (``python`` or ``python -m
torch.distributed.run --standalone --nproc-per-node N``), each process with ``--threads`` threads (1: torchrun's
default, so that N processes use N cores), and the table gives its wall time, the peak resident memory of
its largest process (``wait4``'s ``ru_maxrss``, which is the largest over the tree), the patches, the bank and the
build's own seconds. ``--one-chunk N…`` adds, for one process and N images, the build that holds every patch at once
(``chunk_images`` and ``discriminator_patches`` at least the data), as the stage did before streaming.

Every params key is the committed one except those the command line sets: Lite0 (``--backbone-lite0``, layers
blocks.4 and blocks.10), ``--image-size``, ``--max-bank-size``, no border padding; the memory bound printed is
:func:`memory_bound` for those sizes.

    python benchmarks/bank_scale.py --work /tmp/bank-scale --images 1000 5000 20000 --processes 1 2 --one-chunk 1000 5000
    python benchmarks/bank_scale.py --work /tmp/bank-scale --tiny     # a minute: checks that it still works
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from aead.data.mvtec import Sample, write_manifest
from aead.data.synthetic import generate_dataset

REPO = Path(__file__).resolve().parents[1]
CHANNELS = 152  # Lite0's blocks.4 + blocks.10 (the default Lite2 layers give 168)
GREEDY_FLOATS = 36  # per buffered patch while the greedy coreset runs: 32 projected dimensions and 4 running vectors


def write_images(work: Path, count: int, val: int, size: int, pool: int) -> tuple[list[Path], list[Path]]:
    """``count`` training and ``val`` validation PNG images, all distinct, from ``pool`` synthetic ones."""
    generate_dataset(work / "pool", ["bottle"], size, n_train=pool, n_test_good=1, n_test_defect=1, seed=0)
    sources = sorted((work / "pool" / "bottle" / "train" / "good").glob("*.png"))
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sources]
    out = work / "images"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count + val):
        path = out / f"{i:06d}.png"
        if not path.exists():
            turn, image = divmod(i, len(images))
            array = np.roll(images[image], (turn % 7 * 2, turn // 7 % 7 * 2), axis=(0, 1))
            Image.fromarray(array[:, ::-1] if turn % 2 else array).save(path, compress_level=1)
        paths.append(path)
    return paths[:count], paths[count:]


def write_manifests(folder: Path, train: list[Path], val: list[Path]) -> None:
    """train.csv and val.csv as prepare-split writes them (good images of category bottle)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_manifest(folder, "train", [Sample(str(p), "bottle", "good", 0) for p in train])
    write_manifest(folder, "val", [Sample(str(p), "bottle", "good", 0) for p in val])


def memory_bound(bank: int, chunk_images: int, per_image: int, sample: int, image_side: int) -> float:
    """Bytes one process holds for the bank besides the interpreter, torch and the backbone: its buffer (bank + one
    chunk of patches), the greedy selection's temporaries over that buffer, three times the discriminator's sample (on
    the main process, the gather holds its own share, every process's padded share and their concatenation; the
    discriminator's float64 mean and deviation hold the sample and a float64 copy), and a chunk of decoded images."""
    buffer = bank + chunk_images * per_image
    return 4.0 * (buffer * (CHANNELS + GREEDY_FLOATS) + 3 * sample * CHANNELS) + chunk_images * image_side ** 2 * 3


def run(work: Path, params: dict, processes: int, threads: int) -> dict:
    """The bank stage in ``work`` under ``processes`` processes of ``threads`` threads each: seconds, peak GB of its
    largest process, metrics."""
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    start = time.perf_counter()
    with open(work / "log.txt", "w") as log:
        proc = subprocess.Popen([*launcher, str(REPO / "stages" / "build_pretrained_bank.py")], cwd=work, stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the bank stage failed; see {work / 'log.txt'}")
    metrics = json.loads((work / "metrics" / "details" / "pretrained-bank.json").read_text())
    return {"seconds": time.perf_counter() - start, "peak_gb": usage.ru_maxrss / 1e6,
            **metrics["categories"]["bottle"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (images kept between runs)")
    ap.add_argument("--images", type=int, nargs="+", default=[1000, 5000, 20000])
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--image-size", type=int, default=64, help="pretrained.image_size and the generated images' side")
    ap.add_argument("--max-bank-size", type=int, default=4096)
    ap.add_argument("--one-chunk", type=int, nargs="*", default=[],
                    help="numbers of images also built holding every patch at once (one process)")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads of each process (OMP_NUM_THREADS; torchrun's default is 1), so that N processes use "
                         "N cores")
    ap.add_argument("--tiny", action="store_true", help="a few tiny images, chunks of 8, a 5-step discriminator")
    a = ap.parse_args()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(categories=["bottle"], prepared_dir="prepared")
    if a.tiny:
        a.images, a.processes, a.image_size, a.max_bank_size, a.one_chunk = [12, 40], [1, 2], 32, 64, [40]
        params["pretrained"].update(chunk_images=8, discriminator_steps=5)
    params["pretrained"].update(backbone="efficientnet_lite0", layers=["blocks.4", "blocks.10"],
                                image_size=a.image_size, border_padding=0, max_bank_size=a.max_bank_size)
    pre = params["pretrained"]
    train, val = write_images(a.work, max(a.images), 20, a.image_size, pool=min(200, max(a.images)))
    per_image = (a.image_size // 8) ** 2
    runs = [(n, p, False) for n in a.images for p in a.processes] + [(n, 1, True) for n in a.one_chunk]
    runs.sort(key=lambda r: r[0])
    rows = []
    for n, processes, whole in runs:
        work = a.work / f"run-{n}-{processes}{'-whole' if whole else ''}"
        shutil.rmtree(work, ignore_errors=True)
        write_manifests(work / "prepared", train[:n], val)
        setting = {**params, "pretrained": {**pre, **({"chunk_images": n, "discriminator_patches": n * per_image}
                                                      if whole else {})}}
        result = run(work, setting, processes, a.threads)
        bank = min(round(pre["coreset_ratio"] * n * per_image), a.max_bank_size)
        chunk = setting["pretrained"]["chunk_images"]
        bound = memory_bound(bank, min(chunk, -(-n // processes)), per_image,
                             min(setting["pretrained"]["discriminator_patches"], n * per_image), a.image_size)
        row = {"images": n, "processes": processes, "held": "all patches" if whole else f"chunks of {chunk}",
               "bound_gb": bound / 1e9, **result}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\nLite0 at {a.image_size} px ({per_image} patches per image, {CHANNELS} channels), bank of at most "
          f"{a.max_bank_size}, discriminator {pre['discriminator_steps']} steps, {a.threads} thread(s) per process; "
          "peak: the largest process")
    print("| images | processes | held at once | patches | bank | wall s | build s | peak GB | bound beyond the "
          "runtime GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['images']} | {r['processes']} | {r['held']} | {r['patches']} | {r['bank_size']} | "
              f"{r['seconds']:.0f} | {r['build_seconds']:.0f} | {r['peak_gb']:.2f} | {r['bound_gb']:.2f} |")


if __name__ == "__main__":
    main()
