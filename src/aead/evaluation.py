"""The evaluation stages: score the test split with the trained checkpoints, per model and category.

``l1``: per-pixel L1 error (mean over channels), Gaussian-smoothed for localisation.
``ssim``: 1 - SSIM on grayscale with a Gaussian window, then Gaussian smoothing (the seed's heatmaps).
``seg``: the defect probability of the checkpoint's segmentation head (DRAEM-style), Gaussian-smoothed.
``knn``: the distance of each patch's encoder features to the nearest defect-free patch in the checkpoint's memory
bank (PatchCore-style), upsampled and Gaussian-smoothed.
``fused``: the ``seg`` and ``knn`` maps, each put on one scale with its validation statistics (mean and peak scale,
stored with the memory bank), summed and Gaussian-smoothed.
Only the test manifest from prepare-split and the checkpoints are used; nothing is trained here.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from aead import maps, metrics
from aead.calibration import Calibration, calibrate
from aead.checkpoint import Checkpoint, find_checkpoint, load_checkpoint
from aead.corruption import corrupt_batch
from aead.data import Sample, Split, categories_of, read_split, to_float, to_tensor
from aead.errors import CheckpointError, DataError
from aead.params import BANK_METHODS, HEAD_METHODS, METHODS, MODEL_NAMES, MethodName, Params, missing_components
from aead.torch_model import PatchMemory
from aead.training import autocast_for, configure_threads, select_device

Method = MethodName
SCORE_NAMES: tuple[str, ...] = ("mean", "top1", "max")
Log = Callable[[str], None]


@dataclass
class CategoryResult:
    """Scores and maps of one model on one category's test images."""

    samples: list[Sample]
    labels: np.ndarray
    scores: dict[str, np.ndarray]
    maps: np.ndarray
    masks: np.ndarray | None
    has_mask: np.ndarray
    recon: dict[int, np.ndarray] = field(default_factory=dict)


@dataclass
class Evaluation:
    """Everything the stage writes: metrics and the rows of each plot file."""

    metrics: dict[str, Any]
    roc_rows: list[dict[str, Any]] = field(default_factory=list)
    pr_rows: list[dict[str, Any]] = field(default_factory=list)
    category_rows: list[dict[str, Any]] = field(default_factory=list)
    score_rows: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, dict[str, CategoryResult]] = field(default_factory=dict)
    calibration: dict[str, dict[str, Calibration]] = field(default_factory=dict)


def anomaly_maps(method: Method, x: Tensor, recon: Tensor, smooth_sigma: float, window_sigma: float,
                 head: nn.Module | None = None, memory: PatchMemory | None = None,
                 encoder: nn.Module | None = None) -> Tensor:
    """(N, H, W) anomaly map of a batch: smoothed L1 error, smoothed 1 - SSIM, the smoothed defect probability
    of the segmentation ``head`` (``seg``), the smoothed nearest-patch distance to the ``memory`` bank of
    ``encoder`` features (``knn``), or both put on one scale and summed (``fused``)."""
    if method == "l1":
        return maps.gaussian_blur(maps.l1_map(x, recon)[:, None], smooth_sigma)[:, 0]
    if method == "ssim":
        return maps.ssim_error_map(x, recon, window_sigma=window_sigma, smooth_sigma=smooth_sigma)
    if method in HEAD_METHODS and head is None:
        raise ValueError(f"method '{method}' needs the checkpoint's segmentation head")
    if method in BANK_METHODS and (memory is None or encoder is None):
        raise ValueError(f"method '{method}' needs the checkpoint's memory bank and encoder")
    seg = torch.sigmoid(head(x, recon).float())[:, 0] if method in HEAD_METHODS else None  # in autocast if set
    with torch.autocast(x.device.type, enabled=False):  # scaling and smoothing in bf16 would lose digits
        if method == "seg":
            raw = seg
        elif method == "knn":
            raw = memory.distance_map(encoder, x)
        else:
            raw = memory.fuse(seg, memory.distance_map(encoder, x))
        return maps.gaussian_blur(raw.float()[:, None], smooth_sigma)[:, 0]


def require_components(checkpoint: Checkpoint, path: Path | str, method: str) -> None:
    """A clear error when ``method`` needs a part the checkpoint was trained without."""
    if method in HEAD_METHODS and checkpoint.head is None:
        raise CheckpointError(f"{path}: has no segmentation head (trained with segmentation.steps: 0), which "
                              f"method '{method}' needs; use another method, or retrain with segmentation.steps > 0 "
                              "(dvc repro)")
    if method in BANK_METHODS and checkpoint.memory is None:
        raise CheckpointError(f"{path}: has no memory bank (trained with memory_bank.coreset_ratio: 0), which "
                              f"method '{method}' needs; use another method, or retrain with "
                              "memory_bank.coreset_ratio > 0 (dvc repro)")


@torch.inference_mode()
def score_split_methods(checkpoint: Checkpoint, split: Split, methods: tuple[Method, ...], params: Params,
                        device: torch.device, keep_recon: np.ndarray | None = None) -> dict[Method, CategoryResult]:
    """Reconstruct every image of ``split`` once, in batches, and compute each method's maps and image scores
    from that one forward pass.

    ``keep_recon``: indices of images whose reconstruction is kept (for heatmap panels).
    """
    ev = params.evaluate
    n, size = len(split.samples), split.images.shape[1]
    out_maps = {m: np.empty((n, size, size), dtype=np.float32) for m in methods}
    scores = {m: {k: np.empty(n, dtype=np.float64) for k in SCORE_NAMES} for m in methods}
    keep = set() if keep_recon is None else set(int(i) for i in keep_recon)
    recon_kept: dict[int, np.ndarray] = {}
    model = checkpoint.model.to(memory_format=torch.channels_last)
    head = None if checkpoint.head is None else checkpoint.head.to(memory_format=torch.channels_last)
    memory = checkpoint.memory
    autocast, _ = autocast_for(device, params.model.precision)
    for s in range(0, n, ev.batch_size):
        x = to_float(to_tensor(split.images[s : s + ev.batch_size], device))
        with autocast:
            recon = model(x).float()
        for m in methods:
            with autocast if m in HEAD_METHODS else nullcontext():  # memory distances stay in fp32
                amap = anomaly_maps(m, x, recon, ev.smooth_sigma, ev.ssim_window_sigma, head, memory,
                                    model.encoder).float()
            # the map is already smoothed: score it as is (sigma 0 for 'max')
            batch_scores = maps.image_scores(amap, smooth_sigma=0.0)
            for k in SCORE_NAMES:
                scores[m][k][s : s + len(x)] = batch_scores[k].double().cpu().numpy()
            out_maps[m][s : s + len(x)] = amap.cpu().numpy()
        for j in range(len(x)):
            if s + j in keep:
                recon_kept[s + j] = (recon[j].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()
    labels = np.array([smp.label for smp in split.samples], dtype=np.int64)
    has_mask = np.array([smp.label == 0 or smp.mask_path is not None for smp in split.samples], dtype=bool)
    masks = None if split.masks is None else np.asarray(split.masks, dtype=bool)
    return {m: CategoryResult(split.samples, labels, scores[m], out_maps[m], masks, has_mask, recon_kept)
            for m in methods}


def score_split(checkpoint: Checkpoint, split: Split, method: Method, params: Params, device: torch.device,
                keep_recon: np.ndarray | None = None) -> CategoryResult:
    """``score_split_methods`` for one method."""
    return score_split_methods(checkpoint, split, (method,), params, device, keep_recon)[method]


CALIBRATION_CORRUPTION = "perlin"


def with_synthetic_defects(split: Split, seed: int) -> Split:
    """A copy of ``split`` where every image carries a synthetic defect (Perlin blobs, seeded)."""
    gen = torch.Generator().manual_seed(seed)
    x = to_tensor(split.images, torch.device("cpu")).float() / 255.0
    corrupted, _ = corrupt_batch(x, CALIBRATION_CORRUPTION, gen, probability=1.0)
    images = (corrupted.permute(0, 2, 3, 1) * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    return Split([Sample(s.path, s.category, "synthetic", 1) for s in split.samples], images)


def calibrate_on_validation(checkpoint: Checkpoint, val: Split, method: Method, params: Params,
                            device: torch.device) -> Calibration:
    """Fit the threshold of the headline score on validation good images and their synthetic-defect copies."""
    score = params.evaluate.image_score
    good = score_split(checkpoint, val, method, params, device).scores[score]
    bad = score_split(checkpoint, with_synthetic_defects(val, params.model.seed + 7), method, params,
                      device).scores[score]
    return calibrate(good, bad)


def category_metrics(result: CategoryResult, image_score: str, category: str, log: Log,
                     calibration: Calibration | None = None) -> dict[str, Any]:
    """Image- and pixel-level metrics of one category; undefined ones are None, with the reason logged."""
    labels = result.labels
    headline = result.scores[image_score]
    n_good, n_bad = int((labels == 0).sum()), int((labels == 1).sum())
    out: dict[str, Any] = {"n_good": n_good, "n_anomalous": n_bad}
    if n_good == 0 or n_bad == 0:
        missing = "anomalous" if n_bad == 0 else "good"
        out["note"] = f"no {missing} test images: image AUROC, PR-AUC and F1 are undefined"
        log(f"warning: category '{category}' has no {missing} test images; image AUROC is undefined (null)")
    out["image_auroc"] = metrics.auroc(labels, headline)
    out["pr_auc"] = metrics.average_precision(labels, headline)
    if n_good and n_bad:
        f1, thr = metrics.f1_max(labels, headline)
        out["f1_max"], out["threshold"] = float(f1), float(thr)
    else:
        out["f1_max"], out["threshold"] = None, None
    if calibration is not None:
        out["calibrated_threshold"] = calibration.threshold
        at = metrics.precision_recall_f1_at(labels, headline, calibration.threshold)
        out["calibrated"] = {k: at[k] for k in ("precision", "recall", "f1", "tp", "fp", "fn", "tn")}
        out["calibration_validation"] = {"auroc": calibration.validation_auroc,
                                         "good_flagged": calibration.good_flagged}
        warning = calibration.warning()
        if warning:
            out["calibration_warning"] = warning
    out["image_auroc_by_score"] = {k: metrics.auroc(labels, v) for k, v in result.scores.items()}
    out["mean_score_good"] = float(headline[labels == 0].mean()) if n_good else None
    out["mean_score_anomalous"] = float(headline[labels == 1].mean()) if n_bad else None
    mean_error = result.scores["mean"]
    out["mean_error_good"] = float(mean_error[labels == 0].mean()) if n_good else None
    out["mean_error_anomalous"] = float(mean_error[labels == 1].mean()) if n_bad else None
    sel = result.has_mask
    n_masked = int((sel & (labels == 1)).sum())
    out["n_anomalous_with_mask"] = n_masked
    if n_masked < n_bad:
        log(f"note: category '{category}': {n_bad - n_masked} of {n_bad} anomalous images have no mask; "
            "pixel metrics use the others")
    if result.masks is not None and n_masked > 0:
        m, a = result.masks[sel], result.maps[sel]
        out["pixel_auroc"] = metrics.pixel_auroc(m, a)
        out["aupro"] = metrics.aupro(m, a)
    else:
        out["pixel_auroc"], out["aupro"] = None, None
    return out


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def evaluate(params: Params, method: Method, models_root: Path, log: Log = print,
             heatmap_indices: Callable[[list[Sample]], np.ndarray] | None = None) -> Evaluation:
    """Score the test split with both models' checkpoints and compute all metrics and plot rows."""
    configure_threads(params.model.num_threads)
    device = select_device(params.model.device)
    prepared = Path(params.data.prepared_dir)
    test = read_split(prepared, "test")
    val = read_split(prepared, "val")
    size = params.data.image_size
    if test.images.shape[1:] != (size, size, 3):
        raise DataError(f"{prepared / 'test.npy'}: cached images are not {size}x{size}; rerun prepare-split")
    cats = [c for c in params.data.categories if c in categories_of(test.samples)]
    missing = sorted(set(params.data.categories) - set(cats))
    if missing:
        raise DataError(f"{prepared / 'test.csv'}: no test images for {', '.join(missing)}; rerun prepare-split")
    score = params.evaluate.image_score
    ev = Evaluation(metrics={"method": method, "image_score": score})
    for model_name in MODEL_NAMES:
        model_dir = models_root / model_name
        per_cat: dict[str, Any] = {}
        ev.results[model_name] = {}
        ev.calibration[model_name] = {}
        pooled_labels, pooled_scores = [], []
        loaded: dict[Path, Checkpoint] = {}
        for cat in cats:
            path = find_checkpoint(model_dir, cat)
            if path not in loaded:  # a joint model serves every category: load it once
                loaded[path] = load_checkpoint(path, device, expect_model=model_name, expect_image_size=size)
                require_components(loaded[path], path, method)
            ckpt = loaded[path]
            split = test.select([cat])
            keep = heatmap_indices(split.samples) if heatmap_indices else None
            log(f"[{method}] {model_name}/{cat}: scoring {len(split.samples)} test images on {device}")
            result = score_split(ckpt, split, method, params, device, keep_recon=keep)
            cal = calibrate_on_validation(ckpt, val.select([cat]), method, params, device)
            ev.results[model_name][cat] = result
            ev.calibration[model_name][cat] = cal
            per_cat[cat] = category_metrics(result, score, cat, log, cal)
            if "calibration_warning" in per_cat[cat]:
                log(f"warning: [{method}] {model_name}/{cat}: {per_cat[cat]['calibration_warning']}")
            pooled_labels.append(result.labels)
            pooled_scores.append(result.scores[score])
            _append_rows(ev, model_name, cat, result, per_cat[cat], score, params.evaluate.curve_points, cal)
        labels, scores = np.concatenate(pooled_labels), np.concatenate(pooled_scores)
        summary = {
            "image_auroc": _mean([m["image_auroc"] for m in per_cat.values()]),
            "image_auroc_pooled": metrics.auroc(labels, scores),
            "pr_auc": _mean([m["pr_auc"] for m in per_cat.values()]),
            "f1_max": _mean([m["f1_max"] for m in per_cat.values()]),
            "calibrated_f1": _mean([m["calibrated"]["f1"] for m in per_cat.values() if m["f1_max"] is not None]),
            "pixel_auroc": _mean([m["pixel_auroc"] for m in per_cat.values()]),
            "aupro": _mean([m["aupro"] for m in per_cat.values()]),
            "image_auroc_by_score": {
                k: _mean([m["image_auroc_by_score"][k] for m in per_cat.values()]) for k in SCORE_NAMES
            },
            "mean_score_good": float(scores[labels == 0].mean()) if (labels == 0).any() else None,
            "mean_score_anomalous": float(scores[labels == 1].mean()) if (labels == 1).any() else None,
            "mean_error_good": _mean([m["mean_error_good"] for m in per_cat.values()]),
            "mean_error_anomalous": _mean([m["mean_error_anomalous"] for m in per_cat.values()]),
            "categories": per_cat,
        }
        ev.metrics[model_name] = summary
        log(f"[{method}] {model_name}: image AUROC {_fmt(summary['image_auroc'])}  pixel AUROC "
            f"{_fmt(summary['pixel_auroc'])}  AUPRO {_fmt(summary['aupro'])}")
    return ev


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _append_rows(ev: Evaluation, model: str, cat: str, result: CategoryResult, m: dict[str, Any], score: str,
                 points: int, cal: Calibration) -> None:
    labels, s = result.labels, result.scores[score]
    normalized = cal.normalize(s)
    if m["image_auroc"] is not None:
        fpr, tpr, _ = metrics.roc_curve(labels, s)
        fx, fy = metrics.thin_curve(fpr, tpr, points)
        ev.roc_rows += [{"model": model, "category": cat, "fpr": a, "tpr": b} for a, b in zip(fx, fy)]
        precision, recall, _ = metrics.precision_recall_curve(labels, s)
        rx, ry = metrics.thin_curve(recall, precision, points)
        ev.pr_rows += [{"model": model, "category": cat, "recall": a, "precision": b} for a, b in zip(rx, ry)]
    ev.category_rows.append({
        "model": model, "category": cat,
        "image_auroc": _csv(m["image_auroc"]), "pr_auc": _csv(m["pr_auc"]),
        "pixel_auroc": _csv(m["pixel_auroc"]), "aupro": _csv(m["aupro"]),
    })
    for i, smp in enumerate(result.samples):
        ev.score_rows.append({
            "path": smp.path, "category": cat, "defect_type": smp.defect_type, "label": smp.label, "model": model,
            **{k: float(result.scores[k][i]) for k in SCORE_NAMES},
            "normalized": float(normalized[i]), "anomalous": int(s[i] >= cal.threshold),
        })


def _csv(value: float | None) -> Any:
    return "" if value is None else value


def calibration_record(params: Params, method: Method, calibration: dict[str, dict[str, Calibration]]) -> dict[str, Any]:
    """What a deployed model needs to turn its maps into a verdict: the scoring recipe and, per model and
    category, the validation-fitted threshold and normalisation range."""
    ev = params.evaluate
    return {
        "method": method,
        "image_score": ev.image_score,
        "smooth_sigma": ev.smooth_sigma,
        "ssim_window_sigma": ev.ssim_window_sigma,
        "image_size": params.data.image_size,
        "models": {m: {c: cal.to_dict() for c, cal in per.items()} for m, per in calibration.items()},
    }


def not_trained_record(params: Params, method: Method) -> dict[str, Any] | None:
    """The metrics of an evaluation stage whose map needs a part these params do not train (the segmentation
    head with segmentation.steps: 0, the memory bank with memory_bank.coreset_ratio: 0), else None."""
    missing = missing_components(params, method)
    if missing is None:
        return None
    return {"method": method, "image_score": params.evaluate.image_score,
            "note": f"{missing}: there is nothing to score with method '{method}'"}


def heatmap_picker(per_type: int) -> Callable[[list[Sample]], np.ndarray]:
    """Choose the first ``per_type`` test images of each defect type (and of good) for heatmap panels."""

    def pick(samples: list[Sample]) -> np.ndarray:
        chosen: list[int] = []
        seen: dict[str, int] = {}
        for i, smp in enumerate(samples):
            if seen.get(smp.defect_type, 0) < per_type:
                seen[smp.defect_type] = seen.get(smp.defect_type, 0) + 1
                chosen.append(i)
        return np.asarray(chosen, dtype=np.int64)

    return pick
