from __future__ import annotations

import numpy as np
import pytest

from aead.evaluation.calibration import Calibration, calibrate, conformal_rank, needed_good_images, rate_bound


def test_threshold_is_the_conformal_order_statistic_and_sits_at_one_half():
    good = np.arange(1.0, 20.0)  # 19 scores 1..19
    bad = np.array([30.0, 25.0, 17.5])
    cal = calibrate(good, bad, false_alarm_rate=0.1)
    assert conformal_rank(19, 0.1) == 18  # ceil(20 * 0.9)
    assert 18.0 < cal.threshold < 18.0 + 1e-9  # flags scores above the 18th smallest: 19 only
    assert cal.good_flagged == pytest.approx(1 / 19) and cal.synthetic_recall == pytest.approx(2 / 3)
    assert cal.guaranteed_rate == pytest.approx(1 - 18 / 20) and cal.warning() is None
    assert cal.normalize([cal.threshold])[0] == pytest.approx(0.5)
    assert cal.normalize([cal.low, cal.high]).tolist() == [0.0, 1.0]
    assert Calibration.from_dict(cal.to_dict()) == cal


def test_the_false_alarm_rate_is_honoured_on_new_good_images():
    """Split conformal: over many draws of the calibration images, the share of new good images flagged is at
    most the rate asked for on average, for any score distribution (here a skewed one), and close to it."""
    rng = np.random.default_rng(0)
    for n, alpha in ((9, 0.1), (40, 0.1), (200, 0.01)):
        rates = []
        for _ in range(400):
            cal = calibrate(rng.lognormal(0, 1, n), np.array([1.0]), false_alarm_rate=alpha)
            rates.append(np.mean(rng.lognormal(0, 1, 2000) >= cal.threshold))
        assert np.mean(rates) <= alpha + 0.01 and np.mean(rates) >= cal.guaranteed_rate - 0.02
        assert np.quantile(rates, 0.95) <= cal.rate_bound + 0.02  # the rate bound holds with its probability


def test_too_few_good_images_guarantee_less_and_say_how_many_are_needed():
    cal = calibrate(np.arange(5.0), np.array([9.0]), false_alarm_rate=0.01)
    assert needed_good_images(0.01) == 99 and needed_good_images(0.1) == 9 and needed_good_images(0.05) == 19
    assert cal.threshold > 4.0 and cal.guaranteed_rate == pytest.approx(1 / 6)  # the highest of 5: 1 / (n + 1)
    assert "needs at least 99 validation good images, there are 5" in cal.warning()
    assert "0.167" in cal.warning()
    assert "false-alarm rate at most 0.167 on average" in cal.guarantee()


def test_rate_bound_matches_the_beta_distribution():
    # the k-th smallest of n: the flagged share is Beta(n + 1 - k, k); n = 9, k = 9: P(rate <= b) = 1 - (1 - b)^9
    b = rate_bound(9, 9, 0.95)
    assert 1 - (1 - b) ** 9 == pytest.approx(0.95)


def test_normalisation_is_monotone_and_clipped():
    cal = Calibration(threshold=2.0, low=1.0, high=5.0, n_good=3, n_synthetic=3)
    s = np.linspace(-10, 10, 1001)
    n = cal.normalize(s)
    assert (np.diff(n) >= 0).all() and n.min() == 0.0 and n.max() == 1.0
    assert Calibration.from_dict(cal.to_dict()) == cal


def test_validation_diagnostics_of_a_separating_map():
    cal = calibrate(np.array([0.10, 0.12, 0.15, 0.11] * 3), np.array([0.30, 0.25, 0.40]), false_alarm_rate=0.2)
    assert cal.validation_auroc == 1.0 and cal.synthetic_recall == 1.0
    assert cal.warning() is None


def test_bad_rates_are_refused():
    for alpha in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="false_alarm_rate"):
            calibrate(np.arange(5.0), np.array([9.0]), false_alarm_rate=alpha)


def test_calibrations_written_before_the_operating_point_still_load():
    raw = {"threshold": 2.0, "low": 1.0, "high": 5.0, "n_good": 3, "n_synthetic": 3}
    cal = Calibration.from_dict(raw)
    assert cal.validation_auroc is None and cal.good_flagged is None and cal.warning() is None
    assert cal.guarantee() is None and cal.normalize([2.0])[0] == pytest.approx(0.5)
    old = Calibration.from_dict({**raw, "good_flagged": 1.0, "validation_auroc": 0.4})
    assert "flags 3 of 3 validation good images" in old.warning()
