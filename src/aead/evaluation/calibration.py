"""The operating point: a decision threshold with a stated false-alarm rate, and a readable score scale, from
validation images only.

The user states the false-alarm rate ``alpha`` they accept (``evaluate.false_alarm_rate``). The validation split's
good images (held out from ``train/good``, never seen by any model) are exchangeable with the good images the
detector will meet, so the split-conformal rule applies: with ``n`` validation scores, flagging scores above the
``k = ceil((n + 1)(1 - alpha))``-th smallest gives a false-alarm rate of at most ``1 - k / (n + 1) <= alpha`` on
new good images, on average over the draw of the validation images, whatever the score's distribution. Where
``k > n`` (too few images for ``alpha``), the threshold is the highest validation score and the rate it guarantees,
``1 / (n + 1)``, is reported with the number of good images ``alpha`` needs (``ceil(1 / alpha) - 1``). The rate of
one particular threshold varies around that average (it is Beta-distributed); :attr:`Calibration.rate_bound` is
the rate it stays under with probability ``confidence``.

The same validation images with synthetic defects pasted in (seeded) say how many defects the threshold would
catch (``synthetic_recall``) and how well the map separates them (``validation_auroc``); they do not move the
threshold. Scores are mapped piecewise-linearly so that the threshold sits at 0.5, the lowest validation score at 0
and the highest at 1 (clipped to [0, 1]); the map is monotone, so AUROC and the ranking are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

import numpy as np
from scipy import special

from aead.evaluation import metrics
@dataclass(frozen=True)
class Calibration:
    """Raw-score threshold (an image is flagged when its score is at least ``threshold``), the range used to
    normalise scores, and what the threshold guarantees."""

    threshold: float
    low: float
    high: float
    n_good: int
    n_synthetic: int
    validation_auroc: float | None = None  # validation good images against their synthetic-defect copies
    good_flagged: float | None = None  # share of the validation good images the threshold flags
    false_alarm_rate: float | None = None  # the rate asked for (evaluate.false_alarm_rate)
    guaranteed_rate: float | None = None  # the rate the threshold guarantees on average: 1 - k / (n + 1)
    rate_bound: float | None = None  # the rate this threshold stays under with probability bound_confidence
    bound_confidence: float | None = None
    synthetic_recall: float | None = None  # share of the synthetic-defect validation copies the threshold flags

    def normalize(self, scores: Any) -> np.ndarray:
        """Map raw scores to [0, 1] with the threshold at exactly 0.5."""
        return normalize_scores(np.asarray(scores, dtype=np.float64), self.threshold, self.low, self.high)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Calibration:
        """The calibration a :meth:`to_dict` wrote (files from before the diagnostics or the operating point lack
        them)."""
        optional = [f.name for f in fields(cls) if f.default is not MISSING]
        return cls(**{k: raw[k] for k in ("threshold", "low", "high", "n_good", "n_synthetic")},
                   **{k: raw.get(k) for k in optional})

    def needed_good_images(self) -> int | None:
        """How many validation good images the rate asked for needs (None without one)."""
        return None if self.false_alarm_rate is None else needed_good_images(self.false_alarm_rate)

    def guarantee_record(self) -> dict[str, Any]:
        """What the threshold promises about good images, as the metrics and the export's index write it."""
        return {"false_alarm_rate_target": self.false_alarm_rate, "guaranteed_false_alarm_rate": self.guaranteed_rate,
                "false_alarm_rate_bound": self.rate_bound, "n_calibration_good": self.n_good}

    def guarantee(self) -> str | None:
        """One sentence on the false-alarm rate this threshold guarantees, or None for a calibration without it."""
        if self.guaranteed_rate is None:
            return None
        text = (f"threshold from {self.n_good} validation good images: false-alarm rate at most "
                f"{self.guaranteed_rate:.3g} on average")
        if self.rate_bound is not None and self.bound_confidence is not None:
            text += f", below {self.rate_bound:.3g} with probability {self.bound_confidence:g}"
        return text

    def warning(self) -> str | None:
        """Why this threshold's verdicts fall short of what was asked, or None: too few validation good images for
        the false-alarm rate asked for, or (calibrations of the earlier max-F1 rule) a threshold that flags most
        validation good images."""
        if self.guaranteed_rate is not None and self.false_alarm_rate is not None:
            if self.guaranteed_rate > self.false_alarm_rate + 1e-12:
                return (f"evaluate.false_alarm_rate {self.false_alarm_rate:g} needs at least "
                        f"{self.needed_good_images()} validation good images, there are {self.n_good}: the "
                        f"threshold guarantees a false-alarm rate of {self.guaranteed_rate:.3g} only (raise "
                        "data.val_fraction or add train/good images)")
            return None
        if self.good_flagged is None or self.good_flagged <= 0.5:
            return None
        auroc = "undefined" if self.validation_auroc is None else f"{self.validation_auroc:.2f}"
        return (f"the threshold flags {round(self.good_flagged * self.n_good)} of {self.n_good} validation good "
                f"images (validation AUROC of good against synthetic-defect images: {auroc}); its verdicts "
                "are unreliable for this map")


def normalize_scores(scores: Any, threshold: float, low: float, high: float) -> Any:
    """Piecewise-linear map of raw scores (a numpy array or a torch tensor): ``low`` -> 0, ``threshold`` -> exactly 0.5,
    ``high`` -> 1, clipped to [0, 1]. Written as the sum of two clipped ramps, operations numpy and torch share, so
    the exported detectors run this same function in their graphs."""
    below = (0.5 * (scores - low) / max(threshold - low, 1e-12)).clip(0.0, 0.5)
    above = (0.5 * (scores - threshold) / max(high - threshold, 1e-12)).clip(0.0, 0.5)
    return below + above


def needed_good_images(alpha: float) -> int:
    """The fewest good calibration images for which the conformal threshold guarantees ``alpha``:
    ``ceil(1 / alpha) - 1``."""
    return max(1, math.ceil(1.0 / alpha - 1e-9) - 1)


def conformal_rank(n: int, alpha: float) -> int:
    """The rank ``k = ceil((n + 1)(1 - alpha))`` (1-based, capped at ``n``) of the validation score that becomes the
    threshold."""
    return min(n, max(1, math.ceil((n + 1) * (1.0 - alpha) - 1e-9)))


def rate_bound(n: int, k: int, confidence: float) -> float:
    """The false-alarm rate that the threshold at the ``k``-th smallest of ``n`` exchangeable good scores stays
    under with probability ``confidence`` over the draw of those scores: its rate is Beta(n + 1 - k, k)
    distributed."""
    return float(special.betaincinv(n + 1 - k, k, confidence))  # the Beta quantile, as scipy.stats.beta.ppf


def calibrate(good: Any, synthetic: Any, false_alarm_rate: float = 0.1, confidence: float = 0.95) -> Calibration:
    """The split-conformal threshold of validation ``good`` scores for ``false_alarm_rate`` (see the module
    docstring), with diagnostics from the ``synthetic``-defect validation scores."""
    good = np.asarray(good, dtype=np.float64)
    synthetic = np.asarray(synthetic, dtype=np.float64)
    if good.size == 0 or synthetic.size == 0:
        raise ValueError("calibration needs good and synthetic-defect validation scores")
    if not 0.0 < false_alarm_rate < 1.0:
        raise ValueError(f"false_alarm_rate must be strictly between 0 and 1, got {false_alarm_rate}")
    n = good.size
    k = conformal_rank(n, false_alarm_rate)
    threshold = float(np.nextafter(np.sort(good)[k - 1], np.inf))  # flag scores above the k-th smallest
    scores = np.concatenate([good, synthetic])
    labels = np.concatenate([np.zeros(n, int), np.ones(synthetic.size, int)])
    return Calibration(threshold=threshold, low=float(min(scores.min(), threshold)),
                       high=float(max(scores.max(), threshold)), n_good=int(n), n_synthetic=int(synthetic.size),
                       validation_auroc=metrics.auroc(labels, scores),
                       good_flagged=float(np.mean(good >= threshold)), false_alarm_rate=float(false_alarm_rate),
                       guaranteed_rate=(n + 1 - k) / (n + 1), rate_bound=rate_bound(n, k, confidence),
                       bound_confidence=float(confidence), synthetic_recall=float(np.mean(synthetic >= threshold)))
