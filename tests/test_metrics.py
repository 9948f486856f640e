"""Tests for aead.evaluation.metrics against scikit-learn and slow, obvious reference implementations."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from aead.evaluation import metrics as M
from aead.errors import DataError, ParamsError

SEEDS = [0, 1, 2, 3, 4]


def _tied_data(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Random labels and heavily tied scores, mildly informative."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    s = np.round(rng.random(n) + 0.3 * y, 1)  # ~14 distinct values -> many ties
    return y, s


# ----------------------------------------------------------------------- image level


@pytest.mark.parametrize("seed", SEEDS)
def test_auroc_matches_sklearn_with_ties(seed: int) -> None:
    y, s = _tied_data(seed)
    assert M.auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    rng = np.random.default_rng(seed + 100)
    s2 = rng.standard_normal(y.size)
    assert M.auroc(y.astype(int), s2) == pytest.approx(skm.roc_auc_score(y, s2), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_roc_curve_matches_sklearn(seed: int) -> None:
    y, s = _tied_data(seed)
    fpr, tpr, thr = M.roc_curve(y, s)
    efpr, etpr, ethr = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, efpr)
    np.testing.assert_allclose(tpr, etpr)
    assert np.isinf(thr[0])
    np.testing.assert_allclose(thr[1:], ethr[1:])


@pytest.mark.parametrize("seed", SEEDS)
def test_average_precision_matches_sklearn_with_ties(seed: int) -> None:
    y, s = _tied_data(seed)
    assert M.average_precision(y, s) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    rng = np.random.default_rng(seed + 200)
    s2 = rng.random(y.size)
    assert M.average_precision(y, s2) == pytest.approx(skm.average_precision_score(y, s2), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_precision_recall_curve_matches_sklearn(seed: int) -> None:
    y, s = _tied_data(seed)
    p, r, t = M.precision_recall_curve(y, s)
    ep, er, et = skm.precision_recall_curve(y, s)
    np.testing.assert_allclose(p, ep)
    np.testing.assert_allclose(r, er)
    np.testing.assert_allclose(t, et)


def test_perfect_and_random_scorers() -> None:
    rng = np.random.default_rng(7)
    y = rng.random(20_000) < 0.4
    perfect = y + 0.1 * rng.random(y.size)
    assert M.auroc(y, perfect) == 1.0
    assert M.average_precision(y, perfect) == pytest.approx(1.0)
    assert M.f1_max(y, perfect)[0] == pytest.approx(1.0)
    noise = rng.random(y.size)
    assert M.auroc(y, noise) == pytest.approx(0.5, abs=0.02)
    assert M.average_precision(y, noise) == pytest.approx(y.mean(), abs=0.02)
    assert M.auroc(y, -perfect) == 0.0


def test_one_class_gives_none() -> None:
    s = np.linspace(0, 1, 10)
    for y in (np.zeros(10, bool), np.ones(10, bool)):
        assert M.auroc(y, s) is None
        assert M.average_precision(y, s) is None
    with pytest.raises(DataError):
        M.roc_curve(np.zeros(10), s)
    with pytest.raises(DataError):
        M.precision_recall_curve(np.zeros(10), s)


def test_bad_inputs_raise() -> None:
    with pytest.raises(DataError):
        M.auroc([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(DataError):
        M.auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(DataError):
        M.auroc([0, 1], [0.1, np.nan])
    with pytest.raises(DataError):
        M.auroc([], [])


def _f1_brute(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """Every distinct score as threshold; highest threshold among the best F1."""
    results = []
    for t in np.unique(s):
        pred = s >= t
        tp = np.sum(pred & y)
        fp = np.sum(pred & ~y)
        fn = np.sum(~pred & y)
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
        results.append((f1, t))
    best = max(f for f, _ in results)
    return best, max(t for f, t in results if f >= best - 1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_f1_max_matches_brute_force(seed: int) -> None:
    y, s = _tied_data(seed, n=200)
    f1, thr = M.f1_max(y, s)
    ef1, ethr = _f1_brute(y, s)
    assert f1 == pytest.approx(ef1, abs=1e-12)
    assert thr == ethr
    # Reported threshold really reaches the reported F1.
    assert M.precision_recall_f1_at(y, s, thr)["f1"] == pytest.approx(f1, abs=1e-12)


def test_f1_max_without_positives() -> None:
    assert M.f1_max(np.zeros(5), np.arange(5.0)) == (0.0, 4.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_precision_recall_f1_at_matches_sklearn(seed: int) -> None:
    y, s = _tied_data(seed)
    for thr in (-1.0, 0.5, 0.7, 5.0):
        out = M.precision_recall_f1_at(y, s, thr)
        pred = s >= thr
        assert out["precision"] == pytest.approx(skm.precision_score(y, pred, zero_division=0))
        assert out["recall"] == pytest.approx(skm.recall_score(y, pred, zero_division=0))
        assert out["f1"] == pytest.approx(skm.f1_score(y, pred, zero_division=0))
        tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[False, True]).ravel()
        assert (out["tp"], out["fp"], out["fn"], out["tn"]) == (tp, fp, fn, tn)
        json.dumps(out)  # plain Python types


def test_results_are_plain_floats() -> None:
    y, s = _tied_data(0)
    values = [M.auroc(y, s), M.average_precision(y, s), *M.f1_max(y, s)]
    assert all(type(v) is float for v in values)
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 2:4, 2:4] = True
    maps = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
    assert type(M.pixel_auroc(masks, maps)) is float
    assert type(M.aupro(masks, maps)) is float


# -------------------------------------------------------------------------- thinning


def test_thin_curve_keeps_endpoints_and_bounds_count() -> None:
    rng = np.random.default_rng(3)
    y = rng.random(5000) < 0.3
    fpr, tpr, thr = M.roc_curve(y, rng.random(5000) + 0.5 * y)
    for max_points in (2, 10, 200):
        xt, yt = M.thin_curve(fpr, tpr, max_points)
        assert 2 <= xt.size <= max_points
        assert (xt[0], yt[0]) == (fpr[0], tpr[0])
        assert (xt[-1], yt[-1]) == (fpr[-1], tpr[-1])
        assert np.all(np.diff(xt) >= 0)
    # Shape kept: the thinned curve's area is close to the full one.
    xt, yt = M.thin_curve(fpr, tpr, 200)
    full_area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)
    assert np.sum(np.diff(xt) * (yt[1:] + yt[:-1]) / 2) == pytest.approx(full_area, abs=0.01)
    # Indices let callers thin a third array (with an inf threshold) alongside.
    idx = M.thin_indices(fpr, thr, 50)
    assert idx[0] == 0 and idx[-1] == fpr.size - 1 and idx.size <= 50
    assert np.all(np.diff(idx) > 0)


def test_thin_curve_short_or_degenerate() -> None:
    x = np.array([0.0, 0.5, 1.0])
    xt, yt = M.thin_curve(x, x, 200)
    np.testing.assert_array_equal(xt, x)
    xt, yt = M.thin_curve(np.zeros(500), np.ones(500), 20)
    assert xt.size == 2
    with pytest.raises(ParamsError):
        M.thin_curve(x, x, 1)


# ------------------------------------------------------------------------ pixel level


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_pixel_auroc_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = ndimage.gaussian_filter(rng.random((6, 32, 32)), (0, 2, 2)) > 0.55
    maps = (rng.random(masks.shape) + 0.3 * masks).astype(np.float32)
    expected = skm.roc_auc_score(masks.ravel(), maps.ravel())
    assert M.pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    tied = np.round(maps, 1)  # many ties
    assert M.pixel_auroc(masks, tied) == pytest.approx(skm.roc_auc_score(masks.ravel(), tied.ravel()), abs=1e-12)


def test_pixel_auroc_none_and_shapes() -> None:
    maps = np.random.default_rng(0).random((2, 8, 8))
    assert M.pixel_auroc(np.zeros((2, 8, 8), bool), maps) is None
    with pytest.raises(DataError):
        M.pixel_auroc(np.zeros((2, 8, 7), bool), maps)
    single = np.zeros((8, 8), bool)
    single[2:4, 2:5] = True
    assert M.pixel_auroc(single, single.astype(float)) == 1.0  # (H, W) accepted


def _ref_aupro(masks: np.ndarray, maps: np.ndarray, limit: float, thresholds: np.ndarray) -> float:
    """Slow, obvious AUPRO: loop over thresholds and regions, trapezoid to ``limit``."""
    regions = []
    for i, mask in enumerate(masks):
        lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, n + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in sorted(set(thresholds.tolist()), reverse=True):
        pred = maps >= t
        fpr = np.sum(pred & normal) / np.sum(normal)
        pro = np.mean([pred[i][region].mean() for i, region in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def _hand_made_masks() -> np.ndarray:
    """Three 12x12 images: two regions (one only diagonally connected), one region, no defect."""
    masks = np.zeros((3, 12, 12), bool)
    masks[0, 1:4, 1:4] = True  # 3x3 block
    masks[0, 4, 4] = True  # diagonal neighbour of the block: same region with 8-connectivity
    masks[0, 8:11, 6:11] = True  # second region
    masks[0, 11, 0] = True  # third region, on the bottom edge
    masks[1, 0, 0:3] = True  # touches image 0's region only across images: separate
    masks[1, 5:9, 2:4] = True
    return masks  # image 2 has no defect


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_reference(seed: int, limit: float) -> None:
    rng = np.random.default_rng(seed)
    masks = _hand_made_masks()
    maps = np.round(rng.random(masks.shape) + 0.4 * masks * rng.random(masks.shape), 2)
    got = M.aupro(masks, maps, fpr_limit=limit)
    assert got == pytest.approx(_ref_aupro(masks, maps, limit, np.unique(maps)), abs=1e-12)
    for k in (7, 50):
        thresholds = np.linspace(maps.min(), maps.max(), k)
        got = M.aupro(masks, maps, fpr_limit=limit, num_thresholds=k)
        assert got == pytest.approx(_ref_aupro(masks, maps, limit, thresholds), abs=1e-12)


def test_aupro_thresholds_on_exact_score_values() -> None:
    masks = _hand_made_masks()
    maps = np.random.default_rng(5).integers(0, 5, masks.shape) / 4.0  # scores = threshold values
    thresholds = np.linspace(0.0, 1.0, 5)
    assert M.aupro(masks, maps, num_thresholds=5) == pytest.approx(
        _ref_aupro(masks, maps, 0.3, thresholds), abs=1e-12
    )


def test_aupro_perfect_map_and_none() -> None:
    masks = _hand_made_masks()
    assert M.aupro(masks, masks.astype(float)) == 1.0
    assert M.aupro(masks, masks.astype(float), num_thresholds=100) == 1.0
    noisy = masks + 0.5 * np.random.default_rng(0).random(masks.shape)
    assert M.aupro(masks, noisy) == pytest.approx(1.0)
    assert M.aupro(np.zeros((2, 5, 5), bool), np.zeros((2, 5, 5))) is None
    assert M.pro_curve(np.zeros((2, 5, 5), bool), np.zeros((2, 5, 5))) is None
    with pytest.raises(ParamsError):
        M.aupro(masks, noisy, fpr_limit=0.0)
    with pytest.raises(ParamsError):
        M.aupro(masks, noisy, num_thresholds=1)


def test_pro_regions_are_8_connected() -> None:
    masks = np.zeros((1, 6, 6), bool)
    masks[0, 1, 1] = True  # A
    masks[0, 2, 2:4] = True  # B, C: B touches A diagonally only
    maps = np.zeros((1, 6, 6))
    maps[0, 1, 1] = 1.0  # only A detected
    fpr, pro, thr = M.pro_curve(masks, maps)
    assert thr[1] == 1.0 and fpr[1] == 0.0
    assert pro[1] == pytest.approx(1 / 3)  # one region of 3 pixels; 4-connectivity would give 0.5


def test_pro_curve_exact_full() -> None:
    rng = np.random.default_rng(11)
    masks = _hand_made_masks()
    maps = np.round(rng.random(masks.shape) + 0.3 * masks, 1)
    fpr, pro, thr = M.pro_curve(masks, maps)
    assert (fpr[0], pro[0], thr[0]) == (0.0, 0.0, np.inf)
    assert fpr[-1] == pytest.approx(1.0) and pro[-1] == pytest.approx(1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-12)
    np.testing.assert_array_equal(thr[1:], np.unique(maps)[::-1])


def test_aupro_binned_close_to_exact_and_random_map() -> None:
    rng = np.random.default_rng(2)
    masks = ndimage.gaussian_filter(rng.random((40, 64, 64)), (0, 3, 3)) > 0.56
    masks[::3] = False
    maps = (rng.random(masks.shape) + 0.5 * masks * rng.random(masks.shape)).astype(np.float32)
    exact = M.aupro(masks, maps)
    assert M.aupro(masks, maps, num_thresholds=10_000) == pytest.approx(exact, abs=1e-3)
    # Uninformative map: PRO ~ FPR, so the normalised area is ~ fpr_limit / 2.
    assert M.aupro(masks, rng.random(masks.shape)) == pytest.approx(0.15, abs=0.02)


def test_binomial_interval_matches_reference_values() -> None:
    """Clopper-Pearson intervals against R's binom.test (exact, two-sided 95 %)."""
    assert M.binomial_interval(0, 10) == pytest.approx((0.0, 0.3084971), abs=1e-6)
    assert M.binomial_interval(5, 10) == pytest.approx((0.1870860, 0.8129140), abs=1e-6)
    assert M.binomial_interval(10, 10) == pytest.approx((0.6915029, 1.0), abs=1e-6)
    assert M.binomial_interval(3, 104) == pytest.approx((0.005989, 0.081991), abs=1e-5)
    assert M.binomial_interval(0, 0) is None


def test_operating_point_counts_rates_and_trivial_rules() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.6, 0.3, 0.7, 0.4, 0.9])
    op = M.operating_point(labels, scores, 0.5)
    assert (op["tp"], op["fp"], op["fn"], op["tn"]) == (2, 1, 1, 3)
    assert op["false_alarm_rate"] == 0.25 and op["recall"] == pytest.approx(2 / 3)
    assert op["false_alarm_rate_ci"] == pytest.approx(list(M.binomial_interval(1, 4)))
    assert op["flag_all"]["precision"] == pytest.approx(3 / 7) and op["flag_all"]["f1"] == pytest.approx(0.6)
    assert op["flag_none"]["recall"] == 0.0
