"""What pinned training numerics (``model.deterministic: true``) cost, and what they buy, side by side.

Each run trains one autoencoder and a segmentation head on random images in a fresh process (the numerics are chosen
at a process's first computation), for each workload (image size, autoencoder and width), mode and thread count; the
runs alternate between modes so that load on the machine hits them alike:

* ``pinned``: ``model.deterministic: true``: fp32, AVX2 kernels, convolutions in :mod:`aead.training.kernels`' fixed pieces;
* ``fast-fp32``: ``model.deterministic: false, model.precision: fp32`` (oneDNN, this CPU's instruction set);
* ``fast-auto``: ``model.deterministic: false, model.precision: auto`` (bf16 autocast where the CPU has it natively).

It reports training images per second (median over repeats) and each mode's time relative to ``fast-fp32`` (the
factor pinning costs: 2.0 means twice the time), and whether each mode gives the same weights on 1 thread with oneDNN
limited to AVX2 (what another CPU computes) as on all threads with this CPU's own.

    python benchmarks/determinism.py                       # the default run's size and the seed's (~15 min, 2 cores)
    python benchmarks/determinism.py --workloads 64:baseline:8
    python benchmarks/determinism.py --tiny                # seconds: checks that it still works
"""

from __future__ import annotations

import argparse
import csv
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
# size:model:width, images, epochs, head steps: the default run's size and width, and the seed's (256 px, width 32)
WORKLOADS = {"64:baseline:8": (48, 3, 40), "256:multiscale:32": (16, 1, 4)}


def train_once(mode: str, size: int, model_name: str, width: int, images: int, epochs: int, steps: int) -> dict:
    """Train in this process (a fresh one) and return throughput and a digest of the weights."""
    import numpy as np
    import torch

    from aead.params import load_params
    from aead.models.torch_model import build_model
    from aead.training.loops import setup_compute, train_autoencoder, train_segmentation_head

    params = load_params(REPO / "params.yaml")
    model_params = dataclasses.replace(params.model, epochs=epochs, patience=epochs + 1, **MODES[mode])
    device = setup_compute(model_params, training=True)
    rng = np.random.default_rng(0)
    train = (rng.random((images, size, size, 3)) * 255).astype(np.uint8)
    val = (rng.random((max(2, images // 6), size, size, 3)) * 255).astype(np.uint8)
    model = build_model(model_name, width, seed=0)
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
    return {"mode": mode, "workload": f"{size}:{model_name}:{width}", "threads": torch.get_num_threads(),
            "isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "native"),
            "ae_images_per_second": images * epochs / ae_seconds,
            "head_images_per_second": steps * seg.batch_size / head_seconds, "weights": digest.hexdigest()[:16]}


def run_child(mode: str, workload: str, images: int, epochs: int, steps: int, threads: int,
              isa: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in PIN_VARIABLES}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(REPO / "src"))
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--workloads", workload, "--images", str(images),
                          "--epochs", str(epochs), "--steps", str(steps)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(runs: list[dict]) -> list[str]:
    """One line per workload, thread count and mode: median images/s and time relative to fast-fp32."""
    lines = [f"{'workload':18} {'threads':>7} {'mode':10} {'AE img/s':>9} {'head img/s':>11} "
             f"{'time vs fast-fp32 (AE/head)':>28}  same weights on 1 thread + AVX2"]
    native = [r for r in runs if r["isa"] == "native"]
    for workload in dict.fromkeys(r["workload"] for r in runs):
        for threads in sorted({r["threads"] for r in native if r["workload"] == workload}):
            rows = {}
            for mode in MODES:
                own = [r for r in native if (r["workload"], r["threads"], r["mode"]) == (workload, threads, mode)]
                if own:
                    rows[mode] = (statistics.median(r["ae_images_per_second"] for r in own),
                                  statistics.median(r["head_images_per_second"] for r in own), own[0]["weights"])
            base = rows.get("fast-fp32")
            for mode, (ae, head, weights) in rows.items():
                ratio = f"{base[0] / ae:5.2f}x / {base[1] / head:.2f}x" if base else "-"
                other = next((r for r in runs if (r["workload"], r["mode"], r["isa"]) == (workload, mode, "AVX2")),
                             None)
                same = "not run" if other is None else "yes" if other["weights"] == weights else "no"
                lines.append(f"{workload:18} {threads:7d} {mode:10} {ae:9.2f} {head:11.1f} {ratio:>28}  {same}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="one short repeat at 32 px (checks that the script works)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to time")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help="comma-separated size:model:width (model: baseline or multiscale)")
    parser.add_argument("--out", type=Path, help="also write the runs as CSV rows here")
    parser.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        size, model_name, width = args.workloads.split(":")
        print(json.dumps(train_once(args.child, int(size), model_name, int(width), args.images, args.epochs,
                                    args.steps)))
        return
    if args.tiny:
        plan, repeats, thread_counts = {"32:baseline:4": (8, 1, 4)}, 1, [2]
    else:
        plan = {w: WORKLOADS.get(w, (16, 1, 4)) for w in args.workloads.split(",")}
        repeats, thread_counts = args.repeats, args.threads
    runs = []
    for workload, (images, epochs, steps) in plan.items():
        for _ in range(repeats):  # alternate the modes, so that a busy spell of the machine hits all of them
            for threads in thread_counts:
                for mode in MODES:
                    runs.append(run_child(mode, workload, images, epochs, steps, threads, isa=None))
        for mode in ["pinned"] if args.tiny else MODES:  # what another CPU would compute: 1 thread, oneDNN at AVX2
            runs.append(run_child(mode, workload, images, epochs, steps, threads=1, isa="AVX2"))
    print("\n".join(report(runs)))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(runs[0]))
            writer.writeheader()
            writer.writerows(runs)


if __name__ == "__main__":
    main()
