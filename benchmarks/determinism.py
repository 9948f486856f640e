"""What pinned training numerics (``model.deterministic: true``) cost, and what they buy, side by side.

Each mode trains the default baseline autoencoder and segmentation head (params.yaml's widths, batch sizes and
corruption) on the same generated images, in a fresh process per run (the numerics are chosen at a process's first
computation), alternating the modes so that load on the machine hits them alike:

* ``pinned``: ``model.deterministic: true``, fp32, PyTorch's own convolutions, AVX2 kernels (:mod:`aead.numerics`);
* ``fast-fp32``: ``model.deterministic: false, model.precision: fp32`` (oneDNN, this CPU's instruction set);
* ``fast-auto``: ``model.deterministic: false, model.precision: auto`` (bf16 autocast where the CPU has it natively).

It reports images per second (median over repeats) and the ratio to ``pinned``, and whether each mode gives the same
weights for 1 and 2 threads and with oneDNN limited to AVX2 (what another CPU would run).

    python benchmarks/determinism.py              # a few minutes on 2 CPU cores
    python benchmarks/determinism.py --tiny       # seconds: checks that it still works
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {"pinned": {"deterministic": True, "precision": "auto"},
         "fast-fp32": {"deterministic": False, "precision": "fp32"},
         "fast-auto": {"deterministic": False, "precision": "auto"}}
PIN_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")


def train_once(mode: str, epochs: int, steps: int, images: int) -> dict:
    """Train in this process (a fresh one) and return throughput and a digest of the weights."""
    import numpy as np
    import torch

    from aead.params import load_params
    from aead.torch_model import build_model
    from aead.training import setup_compute, train_autoencoder, train_segmentation_head

    params = load_params(REPO / "params.yaml")
    model_params = dataclasses.replace(params.model, epochs=epochs, patience=epochs + 1, **MODES[mode])
    device = setup_compute(model_params, training=True)
    rng = np.random.default_rng(0)
    size = params.data.image_size
    train = (rng.random((images, size, size, 3)) * 255).astype(np.uint8)
    val = (rng.random((max(2, images // 6), size, size, 3)) * 255).astype(np.uint8)
    model = build_model("baseline", params.baseline.base_channels, seed=0)
    start = time.perf_counter()
    result = train_autoencoder(model, train, val, model_params, device, log=lambda m: None)
    ae_seconds = time.perf_counter() - start
    model.load_state_dict(result.state_dict)
    seg = dataclasses.replace(params.segmentation, steps=steps)
    start = time.perf_counter()
    head = train_segmentation_head(model, train, seg, model_params, device, log=lambda m: None)
    head_seconds = time.perf_counter() - start
    digest = hashlib.sha256()
    for state in (result.state_dict, head.state_dict):
        for tensor in state.values():
            digest.update(tensor.numpy().tobytes())
    return {"mode": mode, "threads": torch.get_num_threads(), "isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "native"),
            "ae_images_per_second": images * epochs / ae_seconds,
            "head_images_per_second": steps * seg.batch_size / head_seconds, "weights": digest.hexdigest()[:16]}


def run_child(mode: str, epochs: int, steps: int, images: int, threads: int, isa: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in PIN_VARIABLES}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(REPO / "src"))
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--epochs", str(epochs), "--steps", str(steps),
                          "--images", str(images)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="one short repeat (checks that the script works)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the runs as CSV rows here")
    parser.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=40, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=48, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(train_once(args.child, args.epochs, args.steps, args.images)))
        return
    epochs, steps, images, repeats = (1, 4, 8, 1) if args.tiny else (args.epochs, args.steps, args.images, args.repeats)
    runs = []
    for _ in range(repeats):  # alternate the modes, so that a busy spell of the machine hits all of them
        for mode in MODES:
            runs.append(run_child(mode, epochs, steps, images, threads=2, isa=None))
    for mode in ["pinned"] if args.tiny else MODES:  # what another CPU would compute: 1 thread, oneDNN limited to AVX2
        runs.append(run_child(mode, epochs, steps, images, threads=1, isa="AVX2"))
    print(f"{'mode':10} {'AE img/s':>9} {'head img/s':>11} {'vs pinned':>10}  same weights on 1 thread + AVX2")
    base = {}
    for mode in MODES:
        own = [r for r in runs if r["mode"] == mode and r["isa"] == "native"]
        ae = statistics.median(r["ae_images_per_second"] for r in own)
        head = statistics.median(r["head_images_per_second"] for r in own)
        base.setdefault("ae", ae)
        base.setdefault("head", head)
        other = next((r for r in runs if r["mode"] == mode and r["isa"] == "AVX2"), None)
        same = "not run" if other is None else "yes" if other["weights"] == own[0]["weights"] else "no"
        print(f"{mode:10} {ae:9.1f} {head:11.1f} {ae / base['ae']:5.2f}x/{head / base['head']:.2f}x  {same}")
    if args.out:
        import csv

        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(runs[0]))
            writer.writeheader()
            writer.writerows(runs)


if __name__ == "__main__":
    main()
