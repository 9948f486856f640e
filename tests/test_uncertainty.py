"""Tests for aead.evaluation.uncertainty: stratified seeded resampling, per-resample metrics against the exact ones
computed on the explicitly repeated test set, and the percentile intervals."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from aead.evaluation import metrics as M
from aead.errors import DataError, ParamsError
from aead.evaluation.uncertainty import interval, mean_interval, resample_counts, resampled_metrics


def _blob_case(
    seed: int, n_good: int, n_bad: int, shape: tuple[int, int], blob: float, area: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Labels, image scores, masks, maps and has_mask: smooth noise maps, blob defects of size ~``blob``
    covering about ``area`` of the anomalous images.

    The last anomalous image has no mask (has_mask False) and a bright map, so using it would show.
    """
    rng = np.random.default_rng(seed)
    n = n_good + n_bad
    labels = np.r_[np.zeros(n_good, bool), np.ones(n_bad, bool)]
    field = ndimage.gaussian_filter(rng.random((n, *shape)), (0, blob, blob))
    masks = field > np.quantile(field[n_good:], 1.0 - area)
    masks[:n_good] = False
    signal = ndimage.gaussian_filter(masks.astype(float), (0, 1.5, 1.5)) * rng.uniform(0.05, 0.4, (n, 1, 1))
    maps = (ndimage.gaussian_filter(rng.random((n, *shape)), (0, 2, 2)) + signal).astype(np.float32)
    has_mask = np.ones(n, bool)
    has_mask[-1] = False
    masks[-1] = False
    maps[-1] += 0.5
    scores = maps.reshape(n, -1).max(axis=1)
    return labels, scores, masks, maps, has_mask


CASES = [  # (seed, n_good, n_bad, image shape, blob sigma, defect area): small to large images and regions
    (0, 12, 18, (32, 32), 1.0, 0.03),
    (1, 10, 20, (64, 48), 2.5, 0.05),
    (2, 8, 16, (128, 128), 6.0, 0.02),
    (3, 6, 10, (224, 224), 10.0, 0.01),
]


def _exact(masks: np.ndarray, maps: np.ndarray, copies: np.ndarray) -> tuple[float, float]:
    """Exact pixel AUROC and AUPRO of the images repeated ``copies`` times."""
    m, a = np.repeat(masks, copies, axis=0), np.repeat(maps, copies, axis=0)
    return M.pixel_auroc(m, a), M.aupro(m, a)


# --------------------------------------------------------------------------- resampling


def test_counts_stratified_and_seeded() -> None:
    labels = np.r_[np.zeros(7, int), np.ones(23, int)]
    np.random.default_rng(0).shuffle(labels)
    counts = resample_counts(labels, 500, seed=3)
    assert counts.shape == (500, 30) and counts.dtype == np.int32
    assert (counts >= 0).all()
    np.testing.assert_array_equal(counts[:, labels == 0].sum(axis=1), 7)
    np.testing.assert_array_equal(counts[:, labels == 1].sum(axis=1), 23)
    np.testing.assert_array_equal(resample_counts(labels, 500, seed=3), counts)
    assert not np.array_equal(resample_counts(labels, 500, seed=4), counts)
    # Uniform draws within a class: every image drawn once per resample on average.
    np.testing.assert_allclose(counts.mean(axis=0), 1.0, atol=0.2)
    assert (counts == 0).any() and (counts >= 2).any()  # with replacement


def test_counts_bad_input() -> None:
    with pytest.raises(DataError):
        resample_counts(np.array([0, 1, 2]), 10, 0)
    with pytest.raises(DataError):
        resample_counts(np.array([], dtype=int), 10, 0)
    with pytest.raises(ParamsError):
        resample_counts(np.array([0, 1]), 0, 0)


# ------------------------------------------------------------------------ image AUROC


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_auroc_matches_sklearn_on_repeated_samples(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(80) < 0.35
    scores = np.round(rng.random(80) + 0.3 * labels, 1)  # ~14 distinct values: many ties
    counts = resample_counts(labels, 300, seed)
    got = resampled_metrics(labels, scores, counts)["image_auroc"]
    assert got.shape == (300,)
    for r in range(0, 300, 50):
        expected = roc_auc_score(np.repeat(labels, counts[r]), np.repeat(scores, counts[r]))
        assert got[r] == pytest.approx(expected, abs=1e-12)
    assert np.isfinite(got).all()


def test_image_auroc_one_class_is_nan() -> None:
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    counts = np.array([[1, 1, 1, 1], [2, 0, 0, 0], [0, 0, 3, 1], [0, 1, 1, 0]])
    got = resampled_metrics(labels, scores, counts)["image_auroc"]
    assert got[0] == pytest.approx(0.75)
    assert np.isnan(got[1]) and np.isnan(got[2])
    assert got[3] == 0.0


# ------------------------------------------------------------------------ pixel metrics


@pytest.mark.parametrize("case", CASES)
def test_pixel_metrics_all_ones_close_to_exact(case: tuple) -> None:
    labels, scores, masks, maps, has_mask = _blob_case(*case)
    out = resampled_metrics(labels, scores, np.ones((1, labels.size), int), masks, maps, has_mask)
    pixel, pro = _exact(masks[has_mask], maps[has_mask], np.ones(has_mask.sum(), int))
    assert abs(out["pixel_auroc"][0] - pixel) < 0.005
    assert abs(out["aupro"][0] - pro) < 0.005
    assert 0.3 < pro < 0.99  # a realistic, not degenerate, case


@pytest.mark.parametrize("case", CASES[:3])
def test_pixel_metrics_of_a_resample_match_repeated_images(case: tuple) -> None:
    labels, scores, masks, maps, has_mask = _blob_case(*case)
    counts = resample_counts(labels, 3, seed=case[0])
    out = resampled_metrics(labels, scores, counts, masks, maps, has_mask, fpr_limit=0.2)
    for r in range(counts.shape[0]):
        copies = counts[r][has_mask]
        pixel = M.pixel_auroc(np.repeat(masks[has_mask], copies, 0), np.repeat(maps[has_mask], copies, 0))
        pro = M.aupro(np.repeat(masks[has_mask], copies, 0), np.repeat(maps[has_mask], copies, 0), fpr_limit=0.2)
        assert abs(out["pixel_auroc"][r] - pixel) < 0.005
        assert abs(out["aupro"][r] - pro) < 0.005


def test_pixel_metrics_exact_when_every_value_has_its_own_bin() -> None:
    """With fewer distinct values than bins the binned curves are the exact ones (8-connected regions)."""
    masks = np.zeros((4, 12, 12), bool)
    masks[0, 1:4, 1:4] = True
    masks[0, 4, 4] = True  # touches the block only diagonally: one region
    masks[0, 8:11, 6:11] = True
    masks[0, 11, 0] = True  # on the bottom edge
    masks[1, 0, 0:3] = True  # touches image 0's region only across images: separate
    masks[1, 5:9, 2:4] = True
    rng = np.random.default_rng(5)
    maps = np.round(rng.random(masks.shape) + 0.4 * masks * rng.random(masks.shape), 2)
    labels = np.array([1, 1, 0, 0])
    counts = np.array([[1, 1, 1, 1], [3, 0, 1, 2], [0, 2, 2, 1], [1, 3, 0, 1]])
    for limit in (0.3, 0.05, 1.0):
        out = resampled_metrics(labels, maps.max(axis=(1, 2)), counts, masks, maps, fpr_limit=limit)
        for r, copies in enumerate(counts):
            rep_m, rep_a = np.repeat(masks, copies, 0), np.repeat(maps, copies, 0)
            assert out["pixel_auroc"][r] == pytest.approx(M.pixel_auroc(rep_m, rep_a), abs=1e-12)
            assert out["aupro"][r] == pytest.approx(M.aupro(rep_m, rep_a, fpr_limit=limit), abs=1e-12)


def test_pixel_metrics_nan_without_drawn_defects() -> None:
    labels, scores, masks, maps, has_mask = _blob_case(*CASES[0])
    counts = np.zeros((2, labels.size), int)
    counts[0, :3] = 1  # good images only
    counts[1, [0, -1]] = 2  # a good image and the anomalous one without mask
    out = resampled_metrics(labels, scores, counts, masks, maps, has_mask)
    assert np.isnan(out["pixel_auroc"]).all() and np.isnan(out["aupro"]).all()
    assert np.isnan(out["image_auroc"][0]) and out["image_auroc"][1] == 1.0
    none_masked = resampled_metrics(labels, scores, counts, masks, maps, np.zeros(labels.size, bool))
    assert np.isnan(none_masked["pixel_auroc"]).all() and np.isnan(none_masked["aupro"]).all()


def test_bad_inputs_raise() -> None:
    labels, scores, masks, maps, has_mask = _blob_case(*CASES[0])
    ones = np.ones((2, labels.size), int)
    with pytest.raises(DataError):
        resampled_metrics(labels, scores, ones[:, 1:])
    with pytest.raises(DataError):
        resampled_metrics(labels, scores, -ones)
    with pytest.raises(DataError):
        resampled_metrics(labels, scores, ones.astype(float))
    with pytest.raises(DataError):
        resampled_metrics(labels * 2, scores, ones)
    with pytest.raises(DataError):
        resampled_metrics(labels, np.where(labels, np.nan, scores), ones)
    with pytest.raises(DataError):
        resampled_metrics(labels, scores, ones, masks, None)
    with pytest.raises(DataError):
        resampled_metrics(labels, scores, ones, masks[1:], maps[1:])
    with pytest.raises(DataError):
        resampled_metrics(labels, scores, ones, masks, maps[:, 1:])
    with pytest.raises(DataError):
        resampled_metrics(labels, scores, ones, masks, maps, has_mask[1:])
    with pytest.raises(ParamsError):
        resampled_metrics(labels, scores, ones, masks, maps, fpr_limit=0.0)
    with pytest.raises(ParamsError):
        resampled_metrics(labels, scores, ones, masks, maps, bins=1)


# ---------------------------------------------------------------------------- intervals


def test_interval_and_mean_interval_handle_nan() -> None:
    values = np.r_[np.linspace(0.0, 1.0, 101), np.nan, np.nan]
    lo, hi = interval(values, 0.9)
    assert (lo, hi) == pytest.approx((0.05, 0.95))
    assert isinstance(lo, float) and isinstance(hi, float)
    assert interval(np.full(5, np.nan)) is None
    assert interval(np.array([])) is None
    a = np.array([0.2, 0.4, np.nan, 0.6, 0.8])
    b = np.array([0.4, 0.6, 0.5, np.nan, 1.0])
    # Resamples with a NaN category are left out: means 0.3, 0.5, 0.9.
    assert mean_interval([a, b], 0.5) == pytest.approx((0.4, 0.7))
    assert mean_interval([a, b, np.full(5, np.nan)], 0.5) == mean_interval([a, b], 0.5)  # undefined category
    assert mean_interval([np.full(5, np.nan)]) is None
    assert mean_interval([]) is None
    with pytest.raises(DataError):
        mean_interval([a, b[:4]])
    with pytest.raises(ParamsError):
        interval(values, 1.0)


def test_larger_test_set_gives_narrower_interval() -> None:
    rng = np.random.default_rng(0)

    def width(n: int, seed: int) -> float:
        labels = np.r_[np.zeros(n, bool), np.ones(n, bool)]
        scores = rng.standard_normal(2 * n) + 1.0 * labels
        lo, hi = interval(resampled_metrics(labels, scores, resample_counts(labels, 400, seed))["image_auroc"])
        return hi - lo

    small, large = width(20, 1), width(400, 2)
    assert large < 0.5 * small  # ~ sqrt(20) narrower in theory


def test_well_separated_interval_contains_point_estimate() -> None:
    labels, scores, masks, maps, has_mask = _blob_case(*CASES[1])
    counts = resample_counts(labels, 300, seed=7)
    out = resampled_metrics(labels, scores, counts, masks, maps, has_mask)
    sel = has_mask
    points = {
        "image_auroc": M.auroc(labels, scores),
        "pixel_auroc": M.pixel_auroc(masks[sel], maps[sel]),
        "aupro": M.aupro(masks[sel], maps[sel]),
    }
    for key, point in points.items():
        lo, hi = interval(out[key])
        assert lo < hi and lo <= point <= hi, key
    assert points["pixel_auroc"] > 0.9
    per_category = [out["aupro"], resampled_metrics(labels, scores, resample_counts(labels, 300, 8))["image_auroc"]]
    lo, hi = mean_interval(per_category)
    assert lo <= (points["aupro"] + points["image_auroc"]) / 2 <= hi
