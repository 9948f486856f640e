"""How memory-bank building and nearest-neighbour scoring grow with the number of training patches.

For each number of training patches N (default 50k, 200k, 800k and 3M; 152 channels, the pretrained map's feature
width; random features, since neither cost depends on the values), in a fresh process so that its peak memory is its
own:

* build: the coreset of ``memory_bank.select_coreset`` (``greedy`` and ``random``, coreset_ratio 0.1 capped at
  ``--max-bank-size``, as the pretrained bank does), seconds;
* search: the exact chunked nearest-neighbour distance of ``torch_model.nearest_distance`` from the test patches of
  20 images at 224 px (784 patches each) to that bank, in images per second;
* peak resident memory of the process.

Then the exponent b of build time ~ N^b, fitted on a log-log scale (b = 1: linear). And, end to end with the real
backbone, the pretrained bank of 1,000 training images at 224 px (``fill_pretrained_bank``, default params) and the
full pretrained map's scoring throughput on 224 px images, at batch sizes 4, 8 and 32 (alternated).

Writes ``docs/scaling.csv`` and ``docs/scaling.png`` (``--out`` to change the folder).

    python benchmarks/scaling.py             # about 6 minutes on 2 CPU cores
    python benchmarks/scaling.py --tiny      # seconds: checks that it still works
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CHANNELS = 152
PATCHES_PER_IMAGE = 784  # 28 x 28 at 224 px, stride 8
SCORING_BATCHES = (4, 8, 32)  # batch sizes the end-to-end scoring speed is measured at


def measure(patches: int, method: str, max_bank_size: int, test_images: int) -> dict:
    """Build and search at one size, in this process."""
    import torch

    from aead.models.memory_bank import select_coreset
    from aead.models.torch_model import nearest_distance

    gen = torch.Generator().manual_seed(0)
    features = torch.randn(patches, CHANNELS, generator=gen)
    start = time.perf_counter()
    chosen = select_coreset(features, method, 0.1, max_bank_size, seed=0)
    build = time.perf_counter() - start
    bank = features[chosen].clone()
    del features
    queries = torch.randn(test_images * PATCHES_PER_IMAGE, CHANNELS, generator=gen)
    start = time.perf_counter()
    nearest_distance(queries, bank)
    search = time.perf_counter() - start
    return {"method": method, "patches": patches, "bank_size": len(chosen), "build_seconds": round(build, 3),
            "search_images_per_second": round(test_images / search, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def end_to_end(images: int, size: int) -> dict:
    """The real pretrained bank of ``images`` training images (default params), and the map's scoring speed."""
    import torch

    from aead.models.memory_bank import fill_pretrained_bank, pretrained_memory
    from aead.params import load_params
    from aead.models.scoring import AnomalyMapper
    from aead.data.mvtec import Geometry

    params = load_params(REPO / "params.yaml").pretrained
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(images, size, size, 3), dtype=np.uint8)
    start = time.perf_counter()
    memory, stats, _ = fill_pretrained_bank(pretrained_memory(params), train, params.coreset_method, params.coreset_ratio,
                                         params.max_bank_size, params.seed, torch.device("cpu"), params.batch_size,
                                         log=lambda m: None)
    build = time.perf_counter() - start
    build_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mapper = AnomalyMapper(("pretrained",), (size, size), 1.0, 1.5, params.smooth_sigma, pretrained=memory,
                           geometry=Geometry("shape", (size, size), 1, 1, 1)).eval()
    test = min(images, 48)
    x = torch.from_numpy(train[:test]).permute(0, 3, 1, 2).float().div(255).contiguous(memory_format=torch.channels_last)
    batches = sorted({params.batch_size, *SCORING_BATCHES})
    speeds: dict[int, list[float]] = {b: [] for b in batches}
    with torch.inference_mode():
        mapper(None, x[:8])
        for _ in range(3):  # the batch sizes alternated, so that load on the machine hits them alike
            for batch in batches:
                start = time.perf_counter()
                for s in range(0, test, batch):
                    mapper(None, x[s : s + batch])
                speeds[batch].append(test / (time.perf_counter() - start))
    median = {b: round(float(np.median(v)), 1) for b, v in speeds.items()}
    return {"images": images, "image_size": size, "patches": stats.patches, "bank_size": stats.bank_size,
            "build_seconds": round(build, 1), "scoring_images_per_second": median[params.batch_size],
            "scoring_batch_size": params.batch_size,
            "scoring_images_per_second_by_batch_size": {str(b): v for b, v in median.items()},
            "peak_rss_mib": round(build_rss, 1)}


def child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def exponent(rows: list[dict]) -> float:
    """b of build_seconds ~ patches^b (least squares on log-log)."""
    x = np.log([r["patches"] for r in rows])
    y = np.log([max(r["build_seconds"], 1e-4) for r in rows])
    return float(np.polyfit(x, y, 1)[0])


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        own = [r for r in rows if r["method"] == method]
        n = [r["patches"] for r in own]
        a.loglog(n, [r["build_seconds"] for r in own], "o-", label=f"{method} (b = {exponent(own):.2f})")
        b.semilogx(n, [r["search_images_per_second"] for r in own], "o-", label=method)
    a.set(xlabel="training patches", ylabel="bank build seconds", title="Coreset build: time ~ patches^b")
    b.set(xlabel="training patches", ylabel="images per second (224 px, search only)",
          title="Exact nearest-neighbour search")
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000, 800_000, 3_000_000])
    parser.add_argument("--max-bank-size", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "size":
            print(json.dumps(measure(int(rest[0]), rest[1], int(rest[2]), int(rest[3]))))
        else:
            print(json.dumps(end_to_end(int(rest[0]), int(rest[1]))))
        return
    sizes, test_images, images, size = (([2000, 8000], 2, 16, 64) if args.tiny
                                        else (args.sizes, 20, 1000, 224))
    max_bank = 64 if args.tiny else args.max_bank_size
    rows = []
    for method in ("greedy", "random"):
        for n in sizes:
            rows.append(child(["size", str(n), method, str(max_bank), str(test_images)]))
            print(json.dumps(rows[-1]), flush=True)
    whole = child(["end", str(images), str(size)])
    print(json.dumps(whole), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "scaling.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "scaling-end-to-end.json").write_text(json.dumps(whole, indent=2) + "\n")
    figure(rows, args.out / "scaling.png")
    for method in ("greedy", "random"):
        own = [r for r in rows if r["method"] == method]
        print(f"{method}: build time ~ patches^{exponent(own):.2f}")
    print(f"{images} images at {size} px: bank of {whole['bank_size']} from {whole['patches']} patches built in "
          f"{whole['build_seconds']} s (peak {whole['peak_rss_mib']} MiB); scoring {whole['scoring_images_per_second']} "
          f"images/s at batch size {whole['scoring_batch_size']} "
          f"(by batch size: {whole['scoring_images_per_second_by_batch_size']})")


if __name__ == "__main__":
    main()
