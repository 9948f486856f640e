"""The evaluation stages: score the test split with each trained model, per category, and compute the metrics.

The maps are those of :mod:`aead.models.scoring`. Only the prepared test manifest (and its images at each map's shape), the
validation images (for the leak-free threshold and the fused map's statistics) and the trained models are used;
nothing is trained here.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aead.evaluation import metrics, uncertainty
from aead.evaluation.calibration import Calibration, calibrate
from aead.training.checkpoint import find_checkpoint, load_checkpoint, load_encoder_bank, load_head, load_pretrained_bank
from aead.data.mvtec import Geometry, Sample, Split, categories_of, load_geometry, read_split, resize_image
from aead.errors import CheckpointError, DataError
from aead.params import (PRETRAINED, MethodName, Params, missing_components, models_of, params_record,
                         parts_of)
from aead.models.scoring import RECONSTRUCTION_PARTS, SCORE_NAMES, AnomalyMapper, Inputs, fusion_statistics, score_inputs, with_synthetic_defects
from aead.training.loops import autocast_for, setup_compute

Method = MethodName
Log = Callable[[str], None]
CALIBRATION_SEED_OFFSET = 7  # the synthetic defects of the calibration images: model.seed + 7


@dataclass
class CategoryResult:
    """Scores and maps of one model on one category's test images, and what the heatmap panels show."""

    samples: list[Sample]
    labels: np.ndarray
    scores: dict[str, np.ndarray]
    maps: np.ndarray
    masks: np.ndarray | None
    has_mask: np.ndarray
    images: dict[int, np.ndarray] = field(default_factory=dict)
    recon: dict[int, np.ndarray] = field(default_factory=dict)
    scoring_seconds: float = 0.0  # computing the maps and scores (decoding excluded)


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
    fusion: dict[str, dict[str, list[list[float]]]] = field(default_factory=dict)
    resamples: dict[str, np.ndarray] = field(default_factory=dict)


class TrainedModels:
    """Loads what a method needs for a model and category from ``models_root`` (each file once)."""

    def __init__(self, params: Params, models_root: Path, device: torch.device) -> None:
        self.params = params
        self.root = Path(models_root)
        self.device = device
        self._cache: dict[tuple[str, Path], Any] = {}

    def _get(self, kind: str, path: Path, load: Callable[[], Any]) -> Any:
        if (kind, path) not in self._cache:
            self._cache[(kind, path)] = load()
        return self._cache[(kind, path)]

    def mapper(self, method: str, model: str, category: str) -> AnomalyMapper:
        """The method's map for ``model`` (an autoencoder, or ``pretrained``) and ``category``; a clear error names
        what is missing and how to get it."""
        params, device = self.params, self.device
        parts = parts_of(method, params.evaluate)
        ae = head = memory = pretrained = geometry = None
        out_shape = (params.data.image_size, params.data.image_size)
        if model != PRETRAINED:
            path = find_checkpoint(self.root / model, category)
            ae = self._get("ae", path, lambda: load_checkpoint(path, device, expect_model=model,
                                                                 expect_image_size=params.data.image_size)).model
            if "seg" in parts:
                head_path = find_checkpoint(self.root / "heads" / model, category)
                head = self._get("head", head_path, lambda: load_head(head_path, device))
            if "knn" in parts:
                bank_path = find_checkpoint(self.root / "banks" / model, category)
                memory = self._get("bank", bank_path, lambda: load_encoder_bank(bank_path, device))
        if "pretrained" in parts:
            pre_path = self.root / "pretrained" / f"{category}.pt"
            pretrained, meta = self._get("pretrained", pre_path, lambda: load_pretrained_bank(pre_path, device))
            geometry = bank_geometry(meta)
            out_shape = geometry.shape
        ev = params.evaluate
        mapper = AnomalyMapper(parts, out_shape, ev.smooth_sigma, ev.ssim_window_sigma, params.pretrained.smooth_sigma,
                               autoencoder=ae, head=head, memory=memory, pretrained=pretrained, geometry=geometry)
        return mapper.to(device).eval()


def bank_geometry(meta: dict[str, Any]) -> Geometry:
    """The :class:`Geometry` a pretrained bank was built at (banks written before geometries were recorded resized every
    image to their ``shape``)."""
    if "geometry" in meta:
        return Geometry.from_dict(meta["geometry"])
    shape = (int(meta["shape"][0]), int(meta["shape"][1]))
    return Geometry("shape", shape, 1, 1, 1)


def require_trained(params: Params, method: str) -> None:
    """A clear error when ``method`` needs a part these params do not train."""
    missing = missing_components(params, method)
    if missing:
        raise CheckpointError(f"method '{method}' cannot be scored: {missing}")


def category_inputs(mapper: AnomalyMapper, prepared: Split, with_masks: bool = False) -> tuple[Inputs, np.ndarray | None]:
    """The images of one category's prepared split at each shape ``mapper`` needs (the autoencoder's from the
    prepared cache, the pretrained bank's decoded from the files at its geometry), and with ``with_masks`` the masks
    at the map's ``out_shape``."""
    ae = prepared.images if mapper.needs_autoencoder_input else None
    pre, masks = None, None
    if mapper.needs_pretrained_input:
        assert mapper.geometry is not None
        pre, masks = load_geometry(prepared.samples, mapper.geometry, with_masks=with_masks)
    elif with_masks and prepared.masks is not None:
        masks = np.asarray(prepared.masks, dtype=bool)
    return Inputs(ae, pre), (None if masks is None else np.asarray(masks, dtype=bool))


def scoring_batch_size(params: Params, method: str) -> int:
    """Images per forward pass when scoring with ``method``: the pretrained map's own ``pretrained.batch_size`` (on a
    CPU its backbone at 224 px and more runs fastest in small batches), every other map's ``evaluate.batch_size``."""
    return params.pretrained.batch_size if method == PRETRAINED else params.evaluate.batch_size


def score_category(mapper: AnomalyMapper, split: Split, params: Params, device: torch.device, batch_size: int,
                   keep: np.ndarray | None = None) -> CategoryResult:
    """Score one category's test images, ``batch_size`` at a time; ``keep``: indices whose image (and
    reconstruction) the panels show."""
    inputs, masks = category_inputs(mapper, split, with_masks=True)
    autocast, _ = autocast_for(device, params.model.precision, params.model.deterministic)
    start = time.perf_counter()
    scored = score_inputs(mapper, inputs, batch_size, device, autocast)
    seconds = time.perf_counter() - start
    labels = np.array([smp.label for smp in split.samples], dtype=np.int64)
    has_mask = np.array([smp.label == 0 or smp.mask_path is not None for smp in split.samples], dtype=bool)
    result = CategoryResult(split.samples, labels, scored.scores, scored.maps, masks, has_mask,
                            scoring_seconds=seconds)
    if keep is not None and len(keep):
        _keep_panel_images(result, mapper, inputs, keep, device)
    return result


@torch.inference_mode()
def _keep_panel_images(result: CategoryResult, mapper: AnomalyMapper, inputs: Inputs, keep: np.ndarray,
                       device: torch.device) -> None:
    """The input images (at the map's shape) and, for maps that use the autoencoder's reconstruction (l1, ssim, seg and
    fusions of them), its reconstructions."""
    source = inputs.pretrained if inputs.pretrained is not None else inputs.autoencoder
    for i in keep.tolist():
        image = np.asarray(source[i])
        if source is inputs.pretrained:  # at one pixel scale its own shape, shown at the map's
            image = resize_image(image, mapper.out_shape)
        result.images[i] = image
    uses_recon = any(part in RECONSTRUCTION_PARTS for part in mapper.parts)
    if uses_recon and mapper.autoencoder is not None and inputs.autoencoder is not None:
        x = torch.from_numpy(np.ascontiguousarray(inputs.autoencoder[keep])).permute(0, 3, 1, 2).float().to(device)
        recon = mapper.autoencoder(x / 255.0).float().clamp(0, 1)
        for j, i in enumerate(keep.tolist()):
            result.recon[i] = (recon[j].permute(1, 2, 0) * 255).round().byte().cpu().numpy()


def calibrate_on_validation(mapper: AnomalyMapper, val: Inputs, params: Params, device: torch.device,
                            batch: int) -> Calibration:
    """The operating point of the headline score: the conformal threshold of the validation good images for
    ``evaluate.false_alarm_rate``, with diagnostics from their synthetic-defect copies."""
    score = params.evaluate.image_score
    autocast, _ = autocast_for(device, params.model.precision, params.model.deterministic)
    good = score_inputs(mapper, val, batch, device, autocast).scores[score]
    defective = with_synthetic_defects(val, params.model.seed + CALIBRATION_SEED_OFFSET)
    bad = score_inputs(mapper, defective, batch, device, autocast).scores[score]
    return calibrate(good, bad, params.evaluate.false_alarm_rate, params.evaluate.confidence)


INTERVAL_METRICS = ("image_auroc", "pixel_auroc", "aupro")


def bootstrap(result: CategoryResult, image_score: str, category: str, resamples: int,
              threshold: float | None = None) -> dict[str, np.ndarray]:
    """Each interval metric's value on ``resamples`` bootstrap resamples of the category's test images (stratified,
    seeded by the category's name so that the intervals are reproducible and independent of the other
    categories), and with a ``threshold`` the good images it flags (``false_alarms``) and the defective ones it
    catches (``detections``) in each resample; the metrics need both classes, nothing is drawn with ``resamples`` 0.

    Two runs on the same test images draw the same resamples, so their values pair up resample by resample
    (``aead compare``)."""
    labels = result.labels
    if resamples == 0:
        return {}
    counts = uncertainty.resample_counts(labels, resamples, seed=zlib.crc32(category.encode()))
    out: dict[str, np.ndarray] = {}
    if labels.min() != labels.max():
        masks = result.masks if result.masks is not None and (result.has_mask & (labels == 1)).any() else None
        out.update(uncertainty.resampled_metrics(labels, result.scores[image_score], counts, masks,
                                                 None if masks is None else result.maps, result.has_mask))
    if threshold is not None:
        flagged = result.scores[image_score] >= threshold
        out["false_alarms"] = counts[:, flagged & (labels == 0)].sum(axis=1, dtype=np.int64)
        out["detections"] = counts[:, flagged & (labels == 1)].sum(axis=1, dtype=np.int64)
    return out


def resample_record(model: str, category: str, result: CategoryResult, resampled: dict[str, np.ndarray]
                    ) -> dict[str, np.ndarray]:
    """The arrays ``aead compare`` pairs two runs with, keyed ``<model>/<category>/<name>``: the test images' paths
    and labels (to check that both runs scored the same images) and every value of :func:`bootstrap`."""
    arrays = {"paths": np.array([s.path for s in result.samples], dtype=np.str_),
              "labels": np.asarray(result.labels, dtype=np.int8),
              **{k: np.asarray(v, dtype=np.int64 if k in ("false_alarms", "detections") else np.float64)
                 for k, v in resampled.items()}}
    return {f"{model}/{category}/{k}": v for k, v in arrays.items()}


def pooled_operating_point(per_cat: dict[str, dict[str, Any]], confidence: float) -> dict[str, Any]:
    """The operating point over all categories' test images together (counts summed): the share of all good images
    flagged and of all defective ones caught, with exact binomial intervals, and the flag-all rule's precision and
    F1 beside them; the largest false-alarm rate a category's threshold guarantees and the fewest validation good
    images a category's threshold was fitted on."""
    points = [m["operating_point"] for m in per_cat.values() if "operating_point" in m]
    if not points:
        return {}
    tp, fp, fn, tn = (sum(p[k] for p in points) for k in ("tp", "fp", "fn", "tn"))
    pooled = metrics.operating_point_of(tp, fp, fn, tn, confidence) if tp + fn and fp + tn else {}
    guaranteed = [p["guaranteed_false_alarm_rate"] for p in points if p["guaranteed_false_alarm_rate"] is not None]
    pooled["guaranteed_false_alarm_rate"] = max(guaranteed) if guaranteed else None
    pooled["n_calibration_good"] = min(p["n_calibration_good"] for p in points)
    return pooled


def _interval(values: tuple[float, float] | None) -> list[float] | None:
    return None if values is None else [float(values[0]), float(values[1])]


def category_metrics(result: CategoryResult, image_score: str, category: str, log: Log,
                     calibration: Calibration | None = None, resampled: dict[str, np.ndarray] | None = None,
                     confidence: float = 0.95) -> dict[str, Any]:
    """Image- and pixel-level metrics of one category, with the ``confidence`` intervals of ``resampled`` (see
    :func:`bootstrap`); undefined ones are None, with the reason logged."""
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
        out["operating_point"] = {**metrics.operating_point(labels, headline, calibration.threshold, confidence),
                                  **calibration.guarantee_record(),
                                  "needed_calibration_good": calibration.needed_good_images()}
        out["calibration_validation"] = {"auroc": calibration.validation_auroc,
                                         "good_flagged": calibration.good_flagged,
                                         "synthetic_recall": calibration.synthetic_recall}
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
    for key in INTERVAL_METRICS:
        values = (resampled or {}).get(key)
        out[f"{key}_ci"] = None if values is None or out[key] is None else _interval(
            uncertainty.interval(values, confidence))
    return out


def defect_type_metrics(result: CategoryResult, image_score: str, category: str, threshold: float | None,
                        resamples: int, confidence: float = 0.95) -> dict[str, dict[str, Any]]:
    """Per defect type of a category's defective test images: how many there are, the image AUROC of that type's
    images against all the good ones, with its ``confidence`` interval over ``resamples`` stratified resamples of
    those images (seeded by category and type; none with 0), and at the operating point (``threshold``) the share
    of them flagged with its exact binomial interval. Which kinds of defect a detector misses is what the category's
    AUROC hides. Empty without good test images."""
    labels, scores = result.labels, result.scores[image_score]
    types = np.array([s.defect_type for s in result.samples])
    good = labels == 0
    out: dict[str, dict[str, Any]] = {}
    if not good.any():
        return out
    for kind in sorted(set(types[labels == 1].tolist())):
        mine = (labels == 1) & (types == kind)
        sel = good | mine
        record: dict[str, Any] = {"n": int(mine.sum()), "image_auroc": metrics.auroc(labels[sel], scores[sel]),
                                  "image_auroc_ci": None}
        if resamples:
            counts = uncertainty.resample_counts(labels[sel], resamples, seed=zlib.crc32(f"{category}/{kind}".encode()))
            values = uncertainty.resampled_metrics(labels[sel], scores[sel], counts)["image_auroc"]
            record["image_auroc_ci"] = _interval(uncertainty.interval(values, confidence))
        if threshold is not None:
            caught = int((scores[mine] >= threshold).sum())
            record.update(recall=caught / record["n"],
                          recall_ci=_interval(metrics.binomial_interval(caught, record["n"], confidence)))
        out[kind] = record
    return out


def _throughput(images: int, seconds: float) -> float | None:
    """Images per second, rounded (None when nothing was timed)."""
    return round(images / seconds, 1) if seconds > 0 else None


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def evaluate(params: Params, method: Method, models_root: Path, log: Log = print,
             heatmap_indices: Callable[[list[Sample]], np.ndarray] | None = None) -> Evaluation:
    """Score the test split with both models' checkpoints and compute all metrics and plot rows."""
    device = setup_compute(params.model)
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
    require_trained(params, method)
    ev_params = params.evaluate
    score = ev_params.image_score
    ev = Evaluation(metrics={"method": method, "image_score": score})
    trained = TrainedModels(params, models_root, device)
    autocast, _ = autocast_for(device, params.model.precision, params.model.deterministic)
    batch = scoring_batch_size(params, method)
    for model_name in models_of(method, params.evaluate):
        per_cat: dict[str, Any] = {}
        ev.results[model_name] = {}
        ev.calibration[model_name] = {}
        ev.fusion[model_name] = {}
        pooled_labels, pooled_scores = [], []
        resampled: dict[str, dict[str, np.ndarray]] = {}
        for cat in cats:
            mapper = trained.mapper(method, model_name, cat)
            split = test.select([cat])
            start = time.perf_counter()
            val_inputs, _ = category_inputs(mapper, val.select([cat]))
            if len(mapper.parts) > 1:
                mapper.fusion.copy_(fusion_statistics(mapper, val_inputs, batch, device, autocast))
                ev.fusion[model_name][cat] = mapper.fusion.tolist()
            validation_seconds = time.perf_counter() - start
            keep = heatmap_indices(split.samples) if heatmap_indices else None
            log(f"[{method}] {model_name}/{cat}: scoring {len(split.samples)} test images on {device}")
            result = score_category(mapper, split, params, device, batch, keep=keep)
            start = time.perf_counter()
            cal = calibrate_on_validation(mapper, val_inputs, params, device, batch)
            validation_seconds += time.perf_counter() - start
            ev.results[model_name][cat] = result
            ev.calibration[model_name][cat] = cal
            start = time.perf_counter()
            resampled[cat] = bootstrap(result, score, cat, ev_params.bootstrap_resamples, cal.threshold)
            ev.resamples.update(resample_record(model_name, cat, result, resampled[cat]))
            per_cat[cat] = category_metrics(result, score, cat, log, cal, resampled[cat], ev_params.confidence)
            by_type = defect_type_metrics(result, score, cat, cal.threshold, ev_params.bootstrap_resamples,
                                          ev_params.confidence)
            per_cat[cat]["by_defect_type"] = by_type
            if by_type:
                log(f"[{method}] {model_name}/{cat}: image AUROC by defect type: " + ", ".join(
                    f"{kind} {m['image_auroc']:.3f} ({m['n']})" for kind, m in by_type.items()))
            per_cat[cat].update(scoring_seconds=round(result.scoring_seconds, 3),
                                scoring_images_per_second=_throughput(len(result.labels), result.scoring_seconds),
                                validation_seconds=round(validation_seconds, 3),
                                metrics_seconds=round(time.perf_counter() - start, 3))
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
            "calibrated_f1": _mean([m["operating_point"]["f1"] for m in per_cat.values() if m["f1_max"] is not None]),
            "operating_point": pooled_operating_point(per_cat, ev_params.confidence),
            "pixel_auroc": _mean([m["pixel_auroc"] for m in per_cat.values()]),
            "aupro": _mean([m["aupro"] for m in per_cat.values()]),
            **{f"{key}_ci": _interval(uncertainty.mean_interval(
                [r[key] for r in resampled.values() if key in r], ev_params.confidence)) for key in INTERVAL_METRICS},
            "image_auroc_by_score": {
                k: _mean([m["image_auroc_by_score"][k] for m in per_cat.values()]) for k in SCORE_NAMES
            },
            "mean_score_good": float(scores[labels == 0].mean()) if (labels == 0).any() else None,
            "mean_score_anomalous": float(scores[labels == 1].mean()) if (labels == 1).any() else None,
            "mean_error_good": _mean([m["mean_error_good"] for m in per_cat.values()]),
            "mean_error_anomalous": _mean([m["mean_error_anomalous"] for m in per_cat.values()]),
            "scoring_images_per_second": _throughput(
                sum(len(r.labels) for r in ev.results[model_name].values()),
                sum(r.scoring_seconds for r in ev.results[model_name].values())),
            "categories": per_cat,
        }
        ev.metrics[model_name] = summary
        log(f"[{method}] {model_name}: image AUROC {_fmt(summary['image_auroc'])}  pixel AUROC "
            f"{_fmt(summary['pixel_auroc'])}  AUPRO {_fmt(summary['aupro'])}")
    return ev


HEADLINE_KEYS = ("image_auroc", "image_auroc_low", "image_auroc_high", "pixel_auroc", "aupro", "false_alarm_rate",
                 "false_alarm_rate_low", "false_alarm_rate_high", "recall", "recall_low", "recall_high",
                 "guaranteed_false_alarm_rate", "calibration_good")


def headline(summary: dict[str, Any] | None) -> dict[str, float | None]:
    """The numbers of a model's results that ``dvc metrics show`` lists: image AUROC with its bootstrap interval,
    pixel AUROC, AUPRO (means over categories), and the operating point on all test images together: the share of
    good images its threshold flags and the share of defective ones it catches, each with its exact binomial
    interval, the false-alarm rate the thresholds guarantee (the largest of the categories') and the fewest validation
    good images any category's threshold was fitted on. None where undefined or not computed."""
    summary = summary or {}
    ci = summary.get("image_auroc_ci") or [None, None]
    op = summary.get("operating_point") or {}
    far_ci = op.get("false_alarm_rate_ci") or [None, None]
    recall_ci = op.get("recall_ci") or [None, None]
    values = {"image_auroc": summary.get("image_auroc"), "image_auroc_low": ci[0], "image_auroc_high": ci[1],
              "pixel_auroc": summary.get("pixel_auroc"), "aupro": summary.get("aupro"),
              "false_alarm_rate": op.get("false_alarm_rate"), "false_alarm_rate_low": far_ci[0],
              "false_alarm_rate_high": far_ci[1], "recall": op.get("recall"), "recall_low": recall_ci[0],
              "recall_high": recall_ci[1], "guaranteed_false_alarm_rate": op.get("guaranteed_false_alarm_rate")}
    out: dict[str, float | None] = {k: None if v is None else round(float(v), 4) for k, v in values.items()}
    out["calibration_good"] = op.get("n_calibration_good")
    return out


def headline_name(method: str, model: str) -> str:
    """File name of a map's headline metrics for one model: ``<method>-<model>.json`` (``pretrained.json`` for the
    pretrained map, which has no autoencoder)."""
    return f"{method}.json" if model == PRETRAINED else f"{method}-{model}.json"


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
    ci = m["image_auroc_ci"] or ["", ""]
    ev.category_rows.append({
        "model": model, "category": cat,
        "image_auroc": _csv(m["image_auroc"]), "image_auroc_low": ci[0], "image_auroc_high": ci[1],
        "pr_auc": _csv(m["pr_auc"]), "pixel_auroc": _csv(m["pixel_auroc"]), "aupro": _csv(m["aupro"]),
    })
    for i, smp in enumerate(result.samples):
        ev.score_rows.append({
            "path": smp.path, "category": cat, "defect_type": smp.defect_type, "label": smp.label, "model": model,
            **{k: float(result.scores[k][i]) for k in SCORE_NAMES},
            "normalized": float(normalized[i]), "anomalous": int(s[i] >= cal.threshold),
        })


def _csv(value: float | None) -> Any:
    return "" if value is None else value


def calibration_record(params: Params, method: Method, calibration: dict[str, dict[str, Calibration]],
                       fusion: dict[str, dict[str, list[list[float]]]] | None = None) -> dict[str, Any]:
    """What a deployed model needs to turn its maps into a verdict: the scoring recipe and, per model and
    category, the validation-fitted threshold and normalisation range (and the fused map's statistics), with all
    the params of the run (``aead predict`` scores with them, whatever params.yaml says now)."""
    ev = params.evaluate
    fusion = fusion or {}
    models: dict[str, Any] = {}
    for m, per in calibration.items():
        models[m] = {}
        for c, cal in per.items():
            models[m][c] = cal.to_dict()
            if fusion.get(m, {}).get(c) is not None:
                models[m][c]["fusion"] = fusion[m][c]
    return {
        "method": method,
        "parts": list(parts_of(method, ev)),
        "image_score": ev.image_score,
        "smooth_sigma": ev.smooth_sigma,
        "ssim_window_sigma": ev.ssim_window_sigma,
        "pretrained_smooth_sigma": params.pretrained.smooth_sigma,
        "image_size": params.data.image_size,
        "models": models,
        "params": params_record(params),
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
