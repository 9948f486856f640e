"""Side-by-side speed benchmark: this project's training and evaluation against a reference loop that
behaves like the seed's code, on the same generated data, in one process.

The reference decodes and resizes each PNG with PIL/torchvision at every step, trains float32 NCHW with
batch size 8, and evaluates one image at a time with scikit-image SSIM on NumPy arrays. Each measurement
is repeated and the median is reported, with the ratio ours / reference.

    python benchmarks/benchmark.py                   # full run (several minutes on 2 CPU cores)
    python benchmarks/benchmark.py --tiny            # seconds: what CI runs to check it still works
    python benchmarks/benchmark.py --repro           # also the peak memory of a default `dvc repro`
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from skimage.metrics import structural_similarity
from sklearn.metrics import roc_auc_score
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms import functional as TF

from aead.evaluation import metrics

from aead.models import maps
from aead.data.mvtec import Sample, load_split, scan_category
from aead.params import load_params
from aead.models.scoring import AnomalyMapper, Inputs, score_inputs
from aead.data.synthetic import generate_dataset
from aead.models.torch_model import build_model
from aead.data.mvtec import to_float, to_tensor
from aead.training.loops import autocast_for, train_step

REPO = Path(__file__).resolve().parents[1]


def median_time(fn: Callable[[], None], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def reference_batch(paths: list[str], size: int) -> torch.Tensor:
    """The seed's data path: open, decode, resize, to tensor, every time an image is used."""
    return torch.stack([TF.to_tensor(TF.resize(Image.open(p).convert("RGB"), [size, size])) for p in paths])


def bench_training(paths: list[str], model_name: str, size: int, channels: int, steps: int, repeats: int,
                   params) -> dict[str, float]:
    """Images/s of forward + backward + step: the reference loop vs ours (cached uint8 array, channels-last,
    the real ``train_step`` with the default loss and corruption off so both do the same work)."""
    batch = 8
    ref_model = build_model(model_name, channels, seed=0)
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=1e-3)
    ref_model.train()
    order = [paths[i % len(paths)] for i in range(steps * batch)]

    def reference() -> None:
        for s in range(steps):
            x = reference_batch(order[s * batch : (s + 1) * batch], size)
            loss = (ref_model(x) - x).abs().mean()
            ref_opt.zero_grad()
            loss.backward()
            ref_opt.step()

    cached = to_tensor(np.stack([np.asarray(reference_batch([p], size)[0].permute(1, 2, 0) * 255).round()
                                 .astype(np.uint8) for p in paths]), torch.device("cpu"))
    model = build_model(model_name, channels, seed=0).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mp = dataclasses.replace(params.model, corruption="none", ssim_weight=0.0, grad_clip=0.0)
    autocast, scaler = autocast_for(torch.device("cpu"), params.model.precision, params.model.deterministic)
    gen = torch.Generator().manual_seed(0)
    model.train()
    idx = torch.arange(steps * batch) % cached.shape[0]

    def ours() -> None:
        for s in range(steps):
            train_step(model, opt, to_float(cached[idx[s * batch : (s + 1) * batch]]), mp, gen, autocast, scaler)

    n = steps * batch
    ref_t, our_t = median_time(reference, repeats), median_time(ours, repeats)
    return {"reference_img_s": n / ref_t, "ours_img_s": n / our_t, "ratio": ref_t / our_t}


def flops_per_image(model_name: str, size: int, channels: int) -> float:
    """FLOPs of one training step (forward + backward) per image, counted by torch."""
    model = build_model(model_name, channels, seed=0)
    x = torch.rand(2, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        (model(x) - x).abs().mean().backward()
    return counter.get_total_flops() / 2


def machine_gflops(repeats: int, autocast) -> float:
    """What this machine reaches on a large 3x3 convolution (forward + backward), GFLOP/s, in the same
    precision as our training (``autocast``)."""
    conv = torch.nn.Conv2d(128, 128, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    x = torch.rand(8, 128, 64, 64).contiguous(memory_format=torch.channels_last).requires_grad_()

    def run() -> None:
        with autocast:
            y = conv(x)
        y.float().sum().backward()

    with FlopCounterMode(display=False) as counter:
        run()
    flops = counter.get_total_flops()
    return flops / median_time(run, repeats) / 1e9


def bench_evaluation(samples: list[Sample], size: int, channels: int, batch_size: int, repeats: int,
                     params) -> dict[str, float]:
    """Images/s from image file on disk to image scores (L1 and SSIM maps) and AUROC."""
    model = build_model("multiscale", channels, seed=0).eval()
    labels = np.array([s.label for s in samples])
    if labels.min() == labels.max():
        labels[0] = 1 - labels[0]

    def reference() -> None:
        l1_scores, ssim_scores = [], []
        with torch.no_grad():
            for s in samples:
                x = reference_batch([s.path], size)
                recon = model(x)
                a = x[0].permute(1, 2, 0).numpy()
                b = recon[0].permute(1, 2, 0).numpy()
                l1_scores.append(float(np.abs(a - b).mean()))
                _, smap = structural_similarity(a.mean(2), b.mean(2), data_range=1.0, gaussian_weights=True,
                                                sigma=1.5, use_sample_covariance=False, full=True)
                ssim_scores.append(float((1 - smap).mean()))
        roc_auc_score(labels, l1_scores)
        roc_auc_score(labels, ssim_scores)

    ae = build_model("multiscale", channels, seed=0).eval()
    ev = params.evaluate
    mappers = [AnomalyMapper((m,), (size, size), ev.smooth_sigma, ev.ssim_window_sigma, 0.0, autoencoder=ae)
               for m in ("l1", "ssim")]

    def ours() -> None:
        """As the pipeline runs it: evaluate-l1 and evaluate-ssim each decode, reconstruct and score the images."""
        for mapper in mappers:
            split = load_split(samples, size, with_masks=False)
            scored = score_inputs(mapper, Inputs(split.images, None), batch_size, torch.device("cpu"))
            metrics.auroc(labels, scored.scores["max"])

    one = reference_batch([samples[0].path], size)

    def reference_forward() -> None:
        with torch.no_grad():
            for _ in range(4):
                model(one)

    autocast, _ = autocast_for(torch.device("cpu"), params.model.precision, params.model.deterministic)
    fast = ae.to(memory_format=torch.channels_last)  # the same weights as the reference's model
    one_cl = one.contiguous(memory_format=torch.channels_last)

    def ours_forward() -> None:
        with torch.inference_mode(), autocast:
            for _ in range(4):
                fast(one_cl)

    def decode_only() -> None:
        """The part both sides share: decoding and resizing the files (here in 4 threads, as ours does)."""
        load_split(samples, size, with_masks=False)

    ref_t, our_t, decode_t, ref_fwd, our_fwd = (
        median_time(f, repeats) for f in (reference, ours, decode_only, reference_forward, ours_forward))
    n = len(samples)
    return {"reference_img_s": n / ref_t, "ours_img_s": n / our_t, "ratio": ref_t / our_t,
            "decode_only_img_s": n / (decode_t / 2), "ratio_ceiling": ref_t / (2 * decode_t),
            "forward_share_of_reference": (ref_fwd / 4) / (ref_t / n), "forward_ratio": ref_fwd / our_fwd}


def bench_blur(size: int, repeats: int) -> dict[str, float]:
    """The SSIM window blur of 16 images' five local moments: dense matrix products (what ``maps.gaussian_blur``
    uses up to ``MATMUL_BLUR_MAX`` px) against separable single-channel convolutions (its path beyond)."""
    x = torch.rand(16, 5, size, size)
    k = maps.gaussian_kernel1d(1.5, 3.5)
    conv_t = median_time(lambda: maps._blur_conv(x.reshape(-1, 1, size, size), k, "reflect"), repeats)
    matmul_t = median_time(lambda: maps.gaussian_blur(x, 1.5, 3.5), repeats)
    return {"conv_img_s": 16 / conv_t, "matmul_img_s": 16 / matmul_t, "ratio": conv_t / matmul_t}


def repro_peak_memory(workdir: Path) -> dict[str, float]:
    """Run the default `dvc repro --force` in a fresh copy of the project; peak RSS of its processes."""
    project = workdir / "project"
    subprocess.run(["git", "clone", "-q", str(REPO), str(project)], check=True)
    start = time.perf_counter()
    subprocess.run(["dvc", "repro", "--force"], cwd=project, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"seconds": seconds, "peak_rss_mib": peak_kib / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--repro", action="store_true", help="also measure a default dvc repro")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--channels", type=int, default=32, help="base_channels (32: the seed's models)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    params = load_params(REPO / "params.yaml")
    repeats = 1 if args.tiny else args.repeats
    sizes = (32,) if args.tiny else (128, 256)
    channels = 4 if args.tiny else args.channels
    steps = 1 if args.tiny else 3
    results: dict[str, object] = {"torch_threads": torch.get_num_threads(), "base_channels": channels}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        generate_dataset(root, ["bottle"], max(sizes), n_train=8 if args.tiny else 24,
                         n_test_good=2 if args.tiny else 8, n_test_defect=1 if args.tiny else 8, seed=0)
        train, test = scan_category(root, "bottle")
        paths = [s.path for s in train]
        autocast, _ = autocast_for(torch.device("cpu"), params.model.precision, params.model.deterministic)
        peak_fp32 = machine_gflops(repeats, contextlib.nullcontext())
        peak = machine_gflops(repeats, autocast)
        results["machine_conv_gflops_fp32"] = round(peak_fp32, 1)
        results["machine_conv_gflops"] = round(peak, 1)
        print(f"large 3x3 convolution on this machine: {peak_fp32:.1f} GFLOP/s fp32, {peak:.1f} GFLOP/s in the "
              f"precision our training uses (model.precision={params.model.precision})", flush=True)
        for size in sizes:
            for model_name in ("baseline", "multiscale"):
                r = bench_training(paths, model_name, size, channels, steps, repeats, params)
                gflop = flops_per_image(model_name, size, channels) / 1e9
                r["gflop_per_image"] = round(gflop, 3)
                r["ours_gflops"] = round(gflop * r["ours_img_s"], 1)
                r["fraction_of_conv_peak"] = round(gflop * r["ours_img_s"] / peak, 3)
                results[f"train_{model_name}_{size}"] = {k: round(v, 3) for k, v in r.items()}
                print(f"train {model_name:10s} {size:3d}px: ours {r['ours_img_s']:7.1f} img/s, reference "
                      f"{r['reference_img_s']:7.1f} img/s, ratio {r['ratio']:.2f}x; {gflop:.2f} GFLOP/img, "
                      f"{r['fraction_of_conv_peak']:.0%} of the convolution peak", flush=True)
        # evaluation batch: the params' default at the default size; 1 at 256 px, fastest on a CPU there
        # (measured: 18.4 img/s at batch 1 vs 13.8 at batch 32)
        default = (params.data.image_size, params.multiscale.base_channels, params.evaluate.batch_size)
        for size, width, bs in [(sizes[-1], channels, 2)] if args.tiny else [default, (256, channels, 1)]:
            r = bench_evaluation(test, size, width, bs, repeats, params)
            results[f"evaluate_{size}"] = {**{k: round(v, 3) for k, v in r.items()}, "base_channels": width,
                                           "batch_size": bs}
            print(f"evaluate {size}px, base_channels {width}, batch {bs} (file -> L1 and SSIM maps and scores -> "
                  f"AUROC, as the two pipeline stages do it): ours {r['ours_img_s']:.1f} img/s, reference "
                  f"{r['reference_img_s']:.1f} img/s, ratio {r['ratio']:.2f}x; decoding alone (twice) "
                  f"{r['decode_only_img_s']:.1f} img/s, so no evaluation from files can exceed "
                  f"{r['ratio_ceiling']:.2f}x; the forward pass is "
                  f"{r['forward_share_of_reference']:.0%} of the reference's time and ours is {r['forward_ratio']:.2f}x "
                  "faster (batch 1)", flush=True)
        r = bench_blur(sizes[-1], repeats)
        results[f"blur_{sizes[-1]}"] = {k: round(v, 2) for k, v in r.items()}
        print(f"SSIM window blur {sizes[-1]}px: matrix products {r['matmul_img_s']:.0f} img/s, convolutions "
              f"{r['conv_img_s']:.0f} img/s, ratio {r['ratio']:.2f}x", flush=True)
        if args.repro:
            r = repro_peak_memory(Path(tmp))
            results["default_repro"] = {k: round(v, 1) for k, v in r.items()}
            print(f"default dvc repro --force: {r['seconds']:.0f} s, peak RSS {r['peak_rss_mib']:.0f} MiB")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
