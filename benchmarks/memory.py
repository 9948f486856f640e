"""Peak memory of the real training stage at two data-set sizes: does it grow with the data?

Builds a prepared split (what prepare-split writes) of N training images by repeating a generated
category, then runs ``stages/train.py`` for one epoch on it in a subprocess and samples the process's
``/proc/<pid>/status`` (Linux) every 20 ms:

- ``RssAnon``: anonymous memory (heap, tensors) — what training itself holds;
- ``VmRSS``: everything resident, including pages of the memory-mapped ``train.npy`` that were read. Those
  are page cache the kernel may drop at any time, so they do not limit the data-set size.

    python benchmarks/memory.py                       # 400 and 4000 images at 128 px (about 2 minutes)
    python benchmarks/memory.py --sizes 40 400 --image-size 32   # seconds

The stage (the autoencoder's training) runs with ``params.yaml`` except for one epoch.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

from aead import io
from aead.data.mvtec import read_split, write_manifest
from aead.params import parse_params
from aead.data.prepare import prepare_split
from aead.data.synthetic import generate_dataset

REPO = Path(__file__).resolve().parents[1]


def status_kib(pid: int) -> dict[str, int]:
    """VmRSS and RssAnon of a running process, in KiB (empty once it has exited)."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def grow_split(prepared: Path, n: int) -> None:
    """Rewrite the prepared train split with ``n`` images, repeating the generated ones."""
    base = read_split(prepared, "train", mmap=False)
    reps = np.arange(n) % len(base.samples)
    write_manifest(prepared, "train", [base.samples[j] for j in reps])
    io.write_npy(prepared / "train.npy", base.images[reps])


def peak_memory(params_file: Path, work: Path) -> dict[str, float]:
    """Run one training stage and return its peak RssAnon and VmRSS in MiB, and its wall time."""
    cmd = [sys.executable, str(REPO / "stages" / "train.py"), "--model", "baseline", "--params", str(params_file),
           "--models-dir", str(work / "models"), "--metrics", str(work / "train.json"),
           "--plot", str(work / "train.csv"), "--resume-dir", str(work / "resume")]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks = {"VmRSS": 0, "RssAnon": 0}

    def sample() -> None:
        while proc.poll() is None:
            for k, v in status_kib(proc.pid).items():
                peaks[k] = max(peaks[k], v)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"training failed:\n{err}")
    return {"peak_anon_mib": peaks["RssAnon"] / 1024, "peak_rss_mib": peaks["VmRSS"] / 1024,
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[400, 4000], help="training images")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        generate_dataset(root, ["bottle"], args.image_size, n_train=40, n_test_good=1, n_test_defect=1, seed=0)
        for n in args.sizes:
            work = Path(tmp) / f"n{n}"
            p = copy.deepcopy(raw)
            p["data"].update(root=str(root), categories=["bottle"], image_size=args.image_size,
                             prepared_dir=str(work / "prepared"))
            p["model"].update(epochs=1)
            work.mkdir()
            params_file = work / "params.yaml"
            params_file.write_text(yaml.safe_dump(p))
            prepare_split(parse_params(p).data, log=lambda m: None)
            grow_split(work / "prepared", n)
            array_mib = (work / "prepared" / "train.npy").stat().st_size / 2**20
            r = {"train_npy_mib": array_mib, **peak_memory(params_file, work)}
            results[n] = {k: round(v, 1) for k, v in r.items()}
            print(f"{n:6d} training images at {args.image_size} px (train.npy {array_mib:7.1f} MiB): peak "
                  f"anonymous memory {r['peak_anon_mib']:7.1f} MiB, peak resident {r['peak_rss_mib']:7.1f} MiB "
                  f"(including mapped file pages), {r['seconds']:.0f} s", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
