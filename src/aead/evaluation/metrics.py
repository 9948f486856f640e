"""Anomaly-detection metrics.

Image level: ROC / AUROC and precision-recall / average precision are scikit-learn's (with our input checks and
None where a class is missing); best F1 and F1 at a threshold in numpy.
Pixel level: exact pixel AUROC and the MVTec AD per-region-overlap metric (AUPRO) in vectorised numpy, sized for
hundreds of 256x256 maps: scikit-learn's ``roc_auc_score`` gives the same pixel AUROC (to 1e-16) but took 3.4 s
for 5M pixels against 0.06 s here (measured on the development CPU). Every scalar returned is a plain Python
``float`` / ``int`` so results can go straight into JSON.

Convention everywhere: label 1 / ``True`` = anomalous, a higher score = more
anomalous, and a sample is predicted anomalous when ``score >= threshold``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
from scipy import ndimage, special

from aead.errors import DataError, ParamsError

__all__ = [
    "roc_curve",
    "auroc",
    "precision_recall_curve",
    "average_precision",
    "f1_max",
    "precision_recall_f1_at",
    "thin_indices",
    "thin_curve",
    "pixel_auroc",
    "pro_curve",
    "aupro",
]

# Pixels handled per step in the chunked pixel-level loops (bounds temporary memory).
_CHUNK = 1 << 22


# --------------------------------------------------------------------------- helpers


def _as_labels(labels: Any, name: str = "labels") -> np.ndarray:
    """Return ``labels`` as a bool array; only bool or 0/1 values are accepted."""
    y = np.asarray(labels)
    if y.dtype == bool:
        return y
    if y.size and not np.isin(y, (0, 1)).all():
        raise DataError(f"{name} must be binary (0/1 or bool); got values {np.unique(y)[:5].tolist()}...")
    return y.astype(bool)


def _check_binary(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate image-level inputs; return flat bool labels and float64 scores."""
    y = _as_labels(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape:
        raise DataError(f"labels and scores differ in shape: {y.shape} vs {s.shape}")
    if y.size == 0:
        raise DataError("labels and scores are empty")
    if not np.isfinite(s).all():
        raise DataError("scores contain NaN or infinite values")
    return y.ravel(), s.ravel()


def _binary_clf_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False/true positive counts at each distinct score, thresholds descending."""
    order = np.argsort(s, kind="stable")[::-1]
    s_sorted = s[order]
    y_sorted = y[order]
    # Last index of every run of equal scores: all tied samples switch together.
    ends = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    tps = np.cumsum(y_sorted, dtype=np.int64)[ends]
    fps = ends + 1 - tps
    return fps, tps, s_sorted[ends]


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoid rule area under ``y(x)``."""
    if x.size < 2:
        return 0.0
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)


# ------------------------------------------------------------------------ image level


def roc_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr, thresholds)``, one point per distinct score: scikit-learn's
    ``roc_curve(drop_intermediate=False)`` (first point (0, 0) at threshold ``inf``; thresholds decrease). Raises
    ``DataError`` unless both classes are present."""
    y, s = _check_binary(labels, scores)
    if y.all() or not y.any():
        raise DataError("ROC curve needs both normal and anomalous samples")
    return _sklearn().roc_curve(y, s, drop_intermediate=False)


def auroc(labels: Any, scores: Any) -> float | None:
    """Area under the ROC curve (scikit-learn's ``roc_auc_score``; ties count half), or None with one class."""
    y, s = _check_binary(labels, scores)
    if y.all() or not y.any():
        return None
    return float(_sklearn().roc_auc_score(y, s))


def precision_recall_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve ``(precision, recall, thresholds)``: scikit-learn's (thresholds increasing; the last
    point is precision 1, recall 0). Raises ``DataError`` when there is no anomalous sample."""
    y, s = _check_binary(labels, scores)
    if not y.any():
        raise DataError("precision-recall curve needs at least one anomalous sample")
    return _sklearn().precision_recall_curve(y, s)


def average_precision(labels: Any, scores: Any) -> float | None:
    """Average precision (scikit-learn's ``average_precision_score``), or None with one class (as :func:`auroc`)."""
    y, s = _check_binary(labels, scores)
    if y.all() or not y.any():
        return None
    return float(_sklearn().average_precision_score(y, s))


def f1_max(labels: Any, scores: Any) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold reaching it.

    Candidate thresholds are the distinct scores (predict anomalous when
    ``score >= threshold``); on ties the highest such threshold is returned.
    Without anomalous samples F1 is 0 everywhere and the highest score is returned.
    """
    y, s = _check_binary(labels, scores)
    fps, tps, thr = _binary_clf_curve(y, s)
    n_pos = tps[-1]
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (TP + FP + P); the denominator is >= 1 here.
    f1 = 2.0 * tps / (tps + fps + n_pos)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thr[best])


def precision_recall_f1_at(labels: Any, scores: Any, threshold: float) -> dict[str, float | int]:
    """Precision, recall, F1 and the confusion counts when predicting ``score >= threshold``.

    Undefined ratios (0/0) are reported as 0.0, as scikit-learn does.
    """
    y, s = _check_binary(labels, scores)
    pred = s >= float(threshold)
    tp = int(np.count_nonzero(pred & y))
    fp = int(np.count_nonzero(pred & ~y))
    fn = int(np.count_nonzero(~pred & y))
    return precision_recall_f1_of(tp, fp, fn, int(y.size - tp - fp - fn))


def precision_recall_f1_of(tp: int, fp: int, fn: int, tn: int) -> dict[str, float | int]:
    """Precision, recall and F1 of these confusion counts, with the counts (undefined ratios are 0.0)."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2.0 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


def binomial_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Exact (Clopper-Pearson) two-sided ``confidence`` interval of a proportion ``successes / trials``; None
    without trials."""
    if trials == 0:
        return None
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be between 0 and {trials}, got {successes}")
    tail = (1.0 - confidence) / 2.0
    # Beta quantiles (scipy.special's, which scipy.stats.beta.ppf calls, without importing scipy.stats: 1 s)
    low = 0.0 if successes == 0 else float(special.betaincinv(successes, trials - successes + 1, tail))
    high = 1.0 if successes == trials else float(special.betaincinv(successes + 1, trials - successes, 1.0 - tail))
    return low, high


def operating_point(labels: Any, scores: Any, threshold: float, confidence: float = 0.95) -> dict[str, Any]:
    """What flagging ``score >= threshold`` does on a labelled set (see :func:`operating_point_of`)."""
    at = precision_recall_f1_at(labels, scores, threshold)
    return operating_point_of(at["tp"], at["fp"], at["fn"], at["tn"], confidence)


def operating_point_of(tp: int, fp: int, fn: int, tn: int, confidence: float = 0.95) -> dict[str, Any]:
    """The operating point of these confusion counts: the false-alarm rate (good images flagged) and the recall
    (defective images flagged), each with its exact binomial ``confidence`` interval, precision, F1, the counts,
    and the trivial rules beside them (flag every image, flag none)."""
    at = precision_recall_f1_of(tp, fp, fn, tn)
    n_good, n_bad = fp + tn, tp + fn
    prevalence = n_bad / (n_good + n_bad)
    return {
        "false_alarm_rate": fp / n_good if n_good else None,
        "false_alarm_rate_ci": _pair(binomial_interval(fp, n_good, confidence)),
        "recall": at["recall"] if n_bad else None,
        "recall_ci": _pair(binomial_interval(tp, n_bad, confidence)),
        **{k: at[k] for k in ("precision", "f1", "tp", "fp", "fn", "tn")},
        "flag_all": {"false_alarm_rate": 1.0, "recall": 1.0, "precision": prevalence,
                     "f1": 2 * prevalence / (1 + prevalence)},
        "flag_none": {"false_alarm_rate": 0.0, "recall": 0.0, "precision": 0.0, "f1": 0.0},
    }


def _pair(values: tuple[float, float] | None) -> list[float] | None:
    return None if values is None else [values[0], values[1]]


# ---------------------------------------------------------------------- curve thinning


def thin_indices(x: Any, y: Any, max_points: int = 200) -> np.ndarray:
    """Indices of at most ``max_points`` points spread uniformly along the curve's length.

    Arc length is measured after scaling x and y to [0, 1] by their ranges, so
    both axes count equally; the first and last points are always kept and the
    indices are increasing.
    """
    if max_points < 2:
        raise ParamsError(f"max_points must be at least 2, got {max_points}")
    xa = np.asarray(x, dtype=np.float64).ravel()
    ya = np.asarray(y, dtype=np.float64).ravel()
    if xa.shape != ya.shape:
        raise DataError(f"x and y differ in length: {xa.size} vs {ya.size}")
    n = xa.size
    if n <= max_points:
        return np.arange(n)

    def _scaled_steps(v: np.ndarray) -> np.ndarray:
        d = np.abs(np.diff(v))
        d[~np.isfinite(d)] = 0.0  # e.g. the inf threshold of an ROC curve
        finite = v[np.isfinite(v)]
        span = float(finite.max() - finite.min()) if finite.size else 0.0
        return d / span if span > 0 else np.zeros_like(d)

    seg = np.hypot(_scaled_steps(xa), _scaled_steps(ya))
    cum = np.r_[0.0, np.cumsum(seg)]
    if cum[-1] <= 0:
        return np.array([0, n - 1])
    targets = np.linspace(0.0, cum[-1], max_points)
    idx = np.searchsorted(cum, targets, side="left")
    idx[0], idx[-1] = 0, n - 1
    return np.unique(np.clip(idx, 0, n - 1))


def thin_curve(x: Any, y: Any, max_points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Thin a curve to at most ``max_points`` points (see :func:`thin_indices`)."""
    idx = thin_indices(x, y, max_points)
    return np.asarray(x).ravel()[idx], np.asarray(y).ravel()[idx]


# ------------------------------------------------------------------------ pixel level


def _check_pixels(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate (N,H,W) (or (H,W)) masks and maps; return bool masks and float maps."""
    m = _as_labels(masks, "masks")
    s = np.asarray(maps)
    if not np.issubdtype(s.dtype, np.floating) or s.dtype.itemsize < 4:
        s = s.astype(np.float32 if s.dtype.itemsize <= 2 else np.float64)
    if m.ndim == 2 and s.ndim == 2:
        m, s = m[None], s[None]
    if m.ndim != 3 or m.shape != s.shape:
        raise DataError(f"masks and maps must both be (N, H, W); got {m.shape} and {s.shape}")
    if m.size == 0:
        raise DataError("masks and maps are empty")
    if not np.isfinite(s).all():
        raise DataError("anomaly maps contain NaN or infinite values")
    return m, s


def pixel_auroc(masks: Any, maps: Any) -> float | None:
    """Exact pixel-level AUROC over all pixels of all images; None with one class.

    Sort-based Mann-Whitney statistic (ties count half), identical to
    scikit-learn's trapezoid ROC AUC on the flattened pixels up to float rounding.
    Memory: about two sorted copies of the maps.
    """
    m, s = _check_pixels(masks, maps)
    m, s = m.ravel(), s.ravel()
    pos = s[m]  # boolean indexing copies, so sorting in place is safe
    neg = s[~m]
    if pos.size == 0 or neg.size == 0:
        return None
    pos.sort()
    neg.sort()
    # Sum over positives of (#negatives below) + (#negatives equal) / 2, doubled to stay integral.
    twice_u = 0
    for start in range(0, pos.size, _CHUNK):
        block = pos[start : start + _CHUNK]
        twice_u += int(np.searchsorted(neg, block, side="left").sum(dtype=np.int64))
        twice_u += int(np.searchsorted(neg, block, side="right").sum(dtype=np.int64))
    return float(twice_u / (2.0 * pos.size * neg.size))


def _label_regions(m: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected ground-truth regions, labelled 1..R across the whole (N,H,W) stack."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connectivity inside each image, never across images
    labels, n_regions = ndimage.label(m, structure=structure)
    return labels, int(n_regions)


def _pro_inputs(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, int] | None:
    """Flat scores, normal-pixel mask and per-pixel PRO weights; None without regions.

    A pixel of region r weighs ``1 / (|r| * R)`` so the weighted fraction of
    detected defect pixels is the mean over regions of each region's overlap.
    """
    m, s = _check_pixels(masks, maps)
    labels, n_regions = _label_regions(m)
    if n_regions == 0:
        return None
    n_neg = int(m.size - np.count_nonzero(m))
    if n_neg == 0:
        raise DataError("AUPRO needs normal pixels (mask == 0) to measure false positives")
    sizes = np.bincount(labels.ravel(), minlength=n_regions + 1).astype(np.float64)
    inv = np.zeros(n_regions + 1)
    inv[1:] = 1.0 / (sizes[1:] * n_regions)
    weights = inv[labels.ravel()]  # 0 for normal pixels
    return s.ravel(), ~m.ravel(), weights, n_neg


def _exact_pro_curve(
    s: np.ndarray, neg: np.ndarray, w: np.ndarray, n_neg: int, floor: float = -np.inf
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PRO curve at every distinct score ``>= floor``, thresholds descending, plus (0, 0, inf).

    Sorts normal and defect scores separately (no arg-sort of all pixels) and reads
    the counts above each threshold off them with ``searchsorted``.
    """
    pos = ~neg
    pos_scores, pos_w = s[pos], w[pos]
    neg_scores = s[neg]
    w_below = 0.0  # PRO weight of defect pixels below the floor (never detected on this part)
    if np.isfinite(floor):
        neg_scores = neg_scores[neg_scores >= floor]
        top = pos_scores >= floor
        w_below = float(pos_w[~top].sum())
        pos_scores, pos_w = pos_scores[top], pos_w[top]
    order = np.argsort(pos_scores)
    pos_sorted = pos_scores[order]
    # cum_w[i]: PRO weight of the i lowest-scoring defect pixels above the floor.
    cum_w = np.r_[0.0, np.cumsum(pos_w[order])]
    neg_sorted = neg_scores  # a copy already (boolean indexing): sort in place
    neg_sorted.sort()
    thr = np.unique(np.concatenate([neg_sorted, pos_sorted]))  # ascending
    fp = neg_sorted.size - np.searchsorted(neg_sorted, thr, side="left")
    # Divided by the total (~1) so that detecting every defect pixel gives exactly 1.
    pro = (cum_w[-1] - cum_w[np.searchsorted(pos_sorted, thr, side="left")]) / (cum_w[-1] + w_below)
    return np.r_[0.0, fp[::-1] / n_neg], np.r_[0.0, pro[::-1]], np.r_[np.inf, thr[::-1]]


def _binned_pro_curve(
    s: np.ndarray, neg: np.ndarray, w: np.ndarray, n_neg: int, num_thresholds: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PRO curve at ``num_thresholds`` thresholds evenly spaced over [min, max] score, plus (0, 0, inf)."""
    lo, hi = float(s.min()), float(s.max())
    thr = np.unique(np.linspace(lo, hi, num_thresholds))
    k = thr.size
    step = (hi - lo) / (k - 1) if k > 1 else 1.0
    neg_hist = np.zeros(k, dtype=np.int64)
    pro_hist = np.zeros(k)
    for start in range(0, s.size, _CHUNK):
        sc = s[start : start + _CHUNK].astype(np.float64)
        # Index of the largest threshold <= score, by arithmetic then an exact fix-up.
        idx = np.clip(np.floor((sc - lo) / step).astype(np.int64), 0, k - 1)
        idx -= (sc < thr[idx]) & (idx > 0)
        up = np.minimum(idx + 1, k - 1)
        idx += (sc >= thr[up]) & (up > idx)
        nc = neg[start : start + _CHUNK]
        neg_hist += np.bincount(idx[nc], minlength=k)
        pro_hist += np.bincount(idx[~nc], weights=w[start : start + _CHUNK][~nc], minlength=k)
    # Predicted at threshold j: every pixel whose bin index is >= j (reverse cumulative sums).
    fp = np.cumsum(neg_hist[::-1])
    pro = np.cumsum(pro_hist[::-1])
    pro /= pro[-1]  # every pixel is at or above the lowest threshold: exactly 1 there
    return np.r_[0.0, fp / n_neg], np.r_[0.0, pro], np.r_[np.inf, thr[::-1]]


def pro_curve(
    masks: Any, maps: Any, num_thresholds: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Full per-region-overlap curve ``(fpr, pro, thresholds)``, thresholds descending.

    ``num_thresholds=None`` uses every distinct score (exact); an int uses that many
    thresholds evenly spaced between the lowest and highest score. The first
    point is (0, 0) at threshold ``inf``. None when the masks hold no defect.
    """
    inputs = _pro_inputs(masks, maps)
    if inputs is None:
        return None
    if num_thresholds is None:
        return _exact_pro_curve(*inputs)
    if num_thresholds < 2:
        raise ParamsError(f"num_thresholds must be at least 2 or None, got {num_thresholds}")
    return _binned_pro_curve(*inputs, num_thresholds=int(num_thresholds))


def _partial_area(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Trapezoid area under ``pro(fpr)`` for fpr in [0, limit], interpolating at ``limit``."""
    n_in = int(np.searchsorted(fpr, limit, side="right"))  # points with fpr <= limit
    x, y = fpr[:n_in], pro[:n_in]
    if x[-1] < limit and n_in < fpr.size:
        x0, y0, x1, y1 = fpr[n_in - 1], pro[n_in - 1], fpr[n_in], pro[n_in]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        x, y = np.r_[x, limit], np.r_[y, y_lim]
    return _trapezoid(x, y)


def aupro(
    masks: Any, maps: Any, fpr_limit: float = 0.3, num_thresholds: int | None = None
) -> float | None:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD's AUPRO).

    PRO at a threshold is the mean, over all 8-connected defect regions of all
    images, of the fraction of the region's pixels with ``score >= threshold``;
    FPR is the fraction of all normal pixels (every image) at or above it. The
    curve is integrated (trapezoid) from FPR 0 to ``fpr_limit``, interpolated
    linearly at the limit, and divided by ``fpr_limit``: a perfect map gives 1.0.

    ``num_thresholds=None`` (default) is exact: every distinct score is a
    threshold; only pixels scoring at or above the score where FPR crosses the
    limit are sorted. An int uses that many evenly spaced thresholds between the
    lowest and highest score (histogram, O(pixels)). None without defect regions.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ParamsError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    inputs = _pro_inputs(masks, maps)
    if inputs is None:
        return None
    s, neg, w, n_neg = inputs
    if num_thresholds is None:
        # Scores below the (k+1)-th highest normal score only matter beyond the FPR limit.
        k = int(np.floor(fpr_limit * n_neg))
        floor = -np.inf
        if k < n_neg:
            neg_scores = s[neg]
            floor = float(np.partition(neg_scores, n_neg - 1 - k)[n_neg - 1 - k])
        fpr, pro, _ = _exact_pro_curve(s, neg, w, n_neg, floor=floor)
    else:
        if num_thresholds < 2:
            raise ParamsError(f"num_thresholds must be at least 2 or None, got {num_thresholds}")
        fpr, pro, _ = _binned_pro_curve(s, neg, w, n_neg, int(num_thresholds))
    return min(1.0, _partial_area(fpr, pro, float(fpr_limit)) / float(fpr_limit))


def _sklearn() -> ModuleType:
    """scikit-learn's metrics, imported at first use: 1.5 s that the stages which compute none (export) skip."""
    from sklearn import metrics as skm

    return skm
