from __future__ import annotations

import numpy as np
import pytest

from aead.calibration import Calibration, calibrate


def test_threshold_separates_and_sits_at_one_half():
    good = np.array([0.10, 0.12, 0.15, 0.11])
    bad = np.array([0.30, 0.25, 0.40])
    cal = calibrate(good, bad)
    assert 0.15 < cal.threshold < 0.25
    assert cal.threshold == pytest.approx(0.20)  # halfway between the highest good and the lowest defect
    assert cal.normalize([cal.threshold])[0] == pytest.approx(0.5)
    assert cal.normalize([cal.low, cal.high]).tolist() == [0.0, 1.0]
    assert (cal.normalize(good) < 0.5).all() and (cal.normalize(bad) > 0.5).all()


def test_normalisation_is_monotone_and_clipped():
    cal = Calibration(threshold=2.0, low=1.0, high=5.0, n_good=3, n_synthetic=3)
    s = np.linspace(-10, 10, 1001)
    n = cal.normalize(s)
    assert (np.diff(n) >= 0).all() and n.min() == 0.0 and n.max() == 1.0
    assert Calibration.from_dict(cal.to_dict()) == cal


def test_overlapping_scores_still_give_a_threshold():
    rng = np.random.default_rng(0)
    cal = calibrate(rng.normal(0, 1, 50), rng.normal(0.5, 1, 50))
    assert cal.low <= cal.threshold <= cal.high


def test_validation_diagnostics_of_a_separating_map():
    cal = calibrate(np.array([0.10, 0.12, 0.15, 0.11]), np.array([0.30, 0.25, 0.40]))
    assert cal.validation_auroc == 1.0 and cal.good_flagged == 0.0
    assert cal.warning() is None
    assert Calibration.from_dict(cal.to_dict()) == cal


def test_a_threshold_that_flags_the_good_images_is_reported():
    # synthetic-defect copies scoring no higher than the good images: the best validation F1 flags everything
    good = np.array([0.30, 0.35, 0.40, 0.45])
    bad = np.array([0.10, 0.20, 0.32, 0.33])
    cal = calibrate(good, bad)
    assert cal.good_flagged == 1.0 and cal.validation_auroc == pytest.approx(2 / 16)
    assert cal.threshold <= good.min()
    assert "flags 4 of 4 validation good images" in cal.warning() and "0.12" in cal.warning()


def test_calibrations_written_before_the_diagnostics_still_load():
    raw = {"threshold": 2.0, "low": 1.0, "high": 5.0, "n_good": 3, "n_synthetic": 3}
    cal = Calibration.from_dict(raw)
    assert cal.validation_auroc is None and cal.good_flagged is None and cal.warning() is None
    assert cal.normalize([2.0])[0] == pytest.approx(0.5)
