"""Seeded bootstrap confidence intervals for image AUROC, pixel AUROC and AUPRO.

Test images are resampled with replacement, stratified by class, and each
resample is a row of draw counts (how often every image is drawn). The
metrics of all resamples are computed at once from those counts:

* image AUROC exactly (weighted Mann-Whitney, ties count half) from one sort;
* pixel AUROC and AUPRO binned: thresholds and per-image histograms are built
  once, and a resample's histograms are the count-weighted sums of them
  (a matrix product), from which the binned ROC and PRO curves follow.

Conventions as in :mod:`aead.evaluation.metrics`: label 1 = anomalous, a higher score =
more anomalous, a pixel is detected when ``score >= threshold``. Undefined
values (e.g. no defect pixel drawn) are NaN.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from aead.errors import DataError, ParamsError
from aead.evaluation.metrics import _CHUNK, _as_labels, _check_binary, _check_pixels, _label_regions

__all__ = ["resample_counts", "resampled_metrics", "interval", "mean_interval"]

# Resamples handled per step (bounds the (rows, images) and (rows, bins) temporaries).
_ROWS = 1024


class _PixelTables(NamedTuple):
    """Per-image pixel histograms over shared bins, for the images the pixel metrics use."""

    rows: np.ndarray  # indices of those images among all test images
    normal: np.ndarray  # (n, bins) normal-pixel counts
    defect: np.ndarray  # (n, bins) defect-pixel counts
    overlap: np.ndarray  # (n, bins) sum over the image's regions of the region's pixel fraction
    regions: np.ndarray  # (n,) number of defect regions


# ---------------------------------------------------------------------------- helpers


def _check_counts(counts: Any, n: int) -> np.ndarray:
    """Validate an (R, n) matrix of non-negative integer draw counts; return it as int64."""
    c = np.asarray(counts)
    if c.ndim != 2 or c.shape[1] != n:
        raise DataError(f"counts must be (n_resamples, {n}); got shape {c.shape}")
    if not np.issubdtype(c.dtype, np.integer):
        raise DataError(f"counts must be integers; got dtype {c.dtype}")
    if c.size and c.min() < 0:
        raise DataError("counts must not be negative")
    return c.astype(np.int64, copy=False)


def _check_level(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ParamsError(f"level must be in (0, 1), got {level}")
    return float(level)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den``, NaN where ``den`` is 0."""
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _thresholds(maps: np.ndarray, bins: int) -> np.ndarray:
    """Up to ``bins`` distinct pixel values at evenly spaced ranks, the lowest value first."""
    flat = np.sort(maps, axis=None)
    picks = np.round(np.linspace(0, flat.size - 1, bins)).astype(np.int64)
    return np.unique(flat[picks])


def _pixel_tables(
    masks: Any, maps: Any, has_mask: Any, n_images: int, bins: int
) -> _PixelTables | None:
    """Bin the pixels of the images with a mask; None when there are none."""
    m, s = _check_pixels(masks, maps)
    if m.shape[0] != n_images:
        raise DataError(f"masks and maps hold {m.shape[0]} images but there are {n_images} labels")
    if has_mask is None:
        rows = np.arange(n_images)
    else:
        sel = _as_labels(has_mask, "has_mask")
        if sel.shape != (n_images,):
            raise DataError(f"has_mask must have shape ({n_images},); got {sel.shape}")
        rows = np.flatnonzero(sel)
        if rows.size < n_images:
            m, s = m[rows], s[rows]
    if rows.size == 0:
        return None
    edges = _thresholds(s, bins)  # same dtype as the maps: comparisons stay exact
    k = edges.size
    labels, n_regions = _label_regions(m)
    sizes = np.bincount(labels.ravel(), minlength=n_regions + 1)
    inv_size = np.zeros(n_regions + 1)
    inv_size[1:] = 1.0 / sizes[1:]
    region_image = [obj[0].start for obj in ndimage.find_objects(labels)]
    n_img, pixels = m.shape[0], m[0].size
    tables = _PixelTables(
        rows=rows,
        normal=np.zeros((n_img, k)),
        defect=np.zeros((n_img, k)),
        overlap=np.zeros((n_img, k)),
        regions=np.bincount(region_image, minlength=n_img).astype(np.float64),
    )
    step = max(1, _CHUNK // pixels)
    for i0 in range(0, n_img, step):
        i1 = min(i0 + step, n_img)
        # Bin j holds edges[j] <= score < edges[j + 1]; key = local image * k + bin.
        key = np.searchsorted(edges, s[i0:i1].ravel(), side="right") - 1
        key += np.repeat(np.arange(i1 - i0) * k, pixels)
        defect = m[i0:i1].ravel()
        size = (i1 - i0) * k
        tables.normal[i0:i1] = np.bincount(key[~defect], minlength=size).reshape(-1, k)
        tables.defect[i0:i1] = np.bincount(key[defect], minlength=size).reshape(-1, k)
        weights = inv_size[labels[i0:i1].ravel()[defect]]
        tables.overlap[i0:i1] = np.bincount(key[defect], weights=weights, minlength=size).reshape(-1, k)
    return tables


def _image_aurocs(y: np.ndarray, s: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Exact AUROC of every resample: weighted Mann-Whitney over tie groups of one sort."""
    order = np.argsort(s, kind="stable")
    s_sorted, pos = s[order], y[order]
    starts = np.r_[0, np.flatnonzero(np.diff(s_sorted)) + 1]  # first index of each tie group
    out = np.empty(counts.shape[0])
    for r0 in range(0, counts.shape[0], _ROWS):
        w = counts[r0 : r0 + _ROWS][:, order]
        neg = np.add.reduceat(np.where(pos, 0, w), starts, axis=1)
        hit = np.add.reduceat(np.where(pos, w, 0), starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg
        # Twice the U statistic: 2 * (negatives below) + (tied negatives), integral.
        twice_u = np.sum(hit * (2 * below + neg), axis=1)
        out[r0 : r0 + _ROWS] = _ratio(twice_u.astype(np.float64), 2.0 * hit.sum(axis=1) * neg.sum(axis=1))
    return out


def _binned_aurocs(normal: np.ndarray, defect: np.ndarray) -> np.ndarray:
    """Per row: AUROC from per-bin counts, pairs within a bin counting half."""
    below = np.cumsum(normal, axis=1) - normal
    u = np.sum(defect * (below + 0.5 * normal), axis=1)
    return _ratio(u, defect.sum(axis=1) * normal.sum(axis=1))


def _partial_areas(x: np.ndarray, y: np.ndarray, limit: float) -> np.ndarray:
    """Per row: trapezoid area under ``y(x)`` for x in [0, limit], interpolating at ``limit``."""
    x0, x1, y0, y1 = x[:, :-1], x[:, 1:], y[:, :-1], y[:, 1:]
    right = np.minimum(x1, limit)
    width = np.maximum(right - x0, 0.0)
    frac = np.zeros_like(width)
    np.divide(right - x0, x1 - x0, out=frac, where=width > 0)  # width > 0 implies x1 > x0
    return np.sum(width * (2.0 * y0 + (y1 - y0) * frac), axis=1) / 2.0


def _binned_aupros(normal: np.ndarray, overlap: np.ndarray, regions: np.ndarray, limit: float) -> np.ndarray:
    """Per row: normalised area under the binned PRO curve up to FPR ``limit``."""
    # Thresholds descending: at edge j every pixel of bins >= j is detected; (0, 0) first.
    fp = np.cumsum(normal[:, ::-1], axis=1)
    hit = np.cumsum(overlap[:, ::-1], axis=1)
    n_normal = fp[:, -1]
    zeros = np.zeros((fp.shape[0], 1))
    fpr = np.hstack([zeros, fp / np.maximum(n_normal, 1.0)[:, None]])
    pro = np.hstack([zeros, hit / np.maximum(regions, 1.0)[:, None]])
    area = np.minimum(_partial_areas(fpr, pro, limit) / limit, 1.0)
    return np.where((n_normal > 0) & (regions > 0), area, np.nan)


def _pixel_metrics(tables: _PixelTables, counts: np.ndarray, fpr_limit: float) -> tuple[np.ndarray, np.ndarray]:
    """Binned pixel AUROC and AUPRO of every resample."""
    pixel, pro = np.empty(counts.shape[0]), np.empty(counts.shape[0])
    for r0 in range(0, counts.shape[0], _ROWS):
        w = counts[r0 : r0 + _ROWS][:, tables.rows].astype(np.float64)
        normal = w @ tables.normal
        pixel[r0 : r0 + _ROWS] = _binned_aurocs(normal, w @ tables.defect)
        pro[r0 : r0 + _ROWS] = _binned_aupros(normal, w @ tables.overlap, w @ tables.regions, fpr_limit)
    return pixel, pro


# -------------------------------------------------------------------------------- API


def resample_counts(labels: Any, n_resamples: int, seed: int) -> np.ndarray:
    """(R, n) int32: how often each test image is drawn in each resample.

    Stratified: within each class a resample draws as many images as the class
    has, with replacement, so every class present in ``labels`` is present in
    every resample. Deterministic given ``seed`` (``np.random.default_rng``).
    """
    y = _as_labels(labels).ravel()
    if y.size == 0:
        raise DataError("labels are empty")
    if int(n_resamples) < 1:
        raise ParamsError(f"n_resamples must be at least 1, got {n_resamples}")
    r, n = int(n_resamples), y.size
    rng = np.random.default_rng(seed)
    offsets = (np.arange(r) * n)[:, None]
    counts = np.zeros(r * n, dtype=np.int64)
    for cls in (False, True):
        members = np.flatnonzero(y == cls)
        if members.size:
            draws = members[rng.integers(0, members.size, size=(r, members.size))]
            counts += np.bincount((offsets + draws).ravel(), minlength=r * n)
    return counts.reshape(r, n).astype(np.int32)


def resampled_metrics(
    labels: Any,
    scores: Any,
    counts: Any,
    masks: Any = None,
    maps: Any = None,
    has_mask: Any = None,
    *,
    fpr_limit: float = 0.3,
    bins: int = 1024,
) -> dict[str, np.ndarray]:
    """Metrics of every resample (row of ``counts``), each an (R,) float array.

    ``'image_auroc'`` always, exact for the resampled multiset (ties count half).
    ``'pixel_auroc'`` and ``'aupro'`` when ``masks`` and ``maps`` (N, H, W) are
    given: binned with at most ``bins`` thresholds at quantiles of the pixel
    values, over the images with ``has_mask`` True (all when None), each counted
    as often as the resample draws it. NaN where a value is undefined.
    """
    y, s = _check_binary(labels, scores)
    c = _check_counts(counts, y.size)
    if not 0.0 < fpr_limit <= 1.0:
        raise ParamsError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if int(bins) < 2:
        raise ParamsError(f"bins must be at least 2, got {bins}")
    out = {"image_auroc": _image_aurocs(y, s, c)}
    if masks is None and maps is None:
        return out
    if masks is None or maps is None:
        raise DataError("masks and maps must be given together")
    tables = _pixel_tables(masks, maps, has_mask, y.size, int(bins))
    if tables is None:
        out["pixel_auroc"], out["aupro"] = np.full(c.shape[0], np.nan), np.full(c.shape[0], np.nan)
    else:
        out["pixel_auroc"], out["aupro"] = _pixel_metrics(tables, c, float(fpr_limit))
    return out


def interval(values: Any, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval holding ``level`` of the finite values; None if there are none."""
    alpha = (1.0 - _check_level(level)) / 2.0
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return None
    lo, hi = np.quantile(v, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def mean_interval(per_category: list[Any], level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of the mean over categories, resample by resample.

    Every category needs the same number of resamples, drawn independently
    (e.g. seeded with the seed plus the category's index). Categories without
    any finite value (metric undefined) are left out, as in the point estimate;
    a resample where a remaining category is NaN is left out of the interval.
    """
    _check_level(level)
    arrays = [np.asarray(v, dtype=np.float64).ravel() for v in per_category]
    if len({a.size for a in arrays}) > 1:
        raise DataError(f"categories differ in number of resamples: {sorted({a.size for a in arrays})}")
    arrays = [a for a in arrays if np.isfinite(a).any()]
    if not arrays:
        return None
    return interval(np.mean(np.stack(arrays), axis=0), level)
