"""A leak-free decision threshold and a readable score scale, from validation images only.

The threshold is fitted on the validation split (good images held out from ``train/good``) and on the
same images with synthetic defects pasted in (seeded), never on the test set. Scores are then mapped
piecewise-linearly so that the threshold sits at 0.5, the lowest validation score at 0 and the highest
at 1 (clipped to [0, 1]); the map is monotone, so AUROC and the ranking are unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from aead import metrics


@dataclass(frozen=True)
class Calibration:
    """Raw-score threshold and the range used to normalise scores."""

    threshold: float
    low: float
    high: float
    n_good: int
    n_synthetic: int
    validation_auroc: float | None = None  # validation good images against their synthetic-defect copies
    good_flagged: float | None = None  # share of the validation good images the threshold flags

    def normalize(self, scores: Any) -> np.ndarray:
        """Map raw scores to [0, 1] with the threshold at exactly 0.5."""
        s = torch.from_numpy(np.asarray(scores, dtype=np.float64))
        return normalize_scores(s, self.bounds()).numpy()

    def bounds(self) -> Tensor:
        """(threshold, low, high) as a float64 tensor, the form :func:`normalize_scores` takes."""
        return torch.tensor([self.threshold, self.low, self.high], dtype=torch.float64)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Calibration:
        """The calibration a :meth:`to_dict` wrote (files from before the validation diagnostics lack them)."""
        return cls(**{k: raw[k] for k in ("threshold", "low", "high", "n_good", "n_synthetic")},
                   **{k: raw.get(k) for k in ("validation_auroc", "good_flagged")})

    def warning(self) -> str | None:
        """Why this threshold's verdicts cannot be trusted, or None: it flags most validation good images,
        which happens when the map scores the synthetic-defect copies no higher than the good images (the
        best F1 on validation is then to flag everything)."""
        if self.good_flagged is None or self.good_flagged <= 0.5:
            return None
        auroc = "undefined" if self.validation_auroc is None else f"{self.validation_auroc:.2f}"
        return (f"the threshold flags {round(self.good_flagged * self.n_good)} of {self.n_good} validation good "
                f"images (validation AUROC of good against synthetic-defect images: {auroc}); its verdicts "
                "are unreliable for this map")


def normalize_scores(scores: Tensor, bounds: Tensor) -> Tensor:
    """Piecewise-linear map of raw scores: ``low`` -> 0, ``threshold`` -> 0.5, ``high`` -> 1, clipped to
    [0, 1]. ``bounds`` is (threshold, low, high). Plain torch ops, so exported detectors use it too."""
    thr, low, high = bounds[0], bounds[1], bounds[2]
    below = 0.5 * (scores - low) / torch.clamp(thr - low, min=1e-12)
    above = 0.5 + 0.5 * (scores - thr) / torch.clamp(high - thr, min=1e-12)
    return torch.where(scores < thr, below, above).clamp(0.0, 1.0)


def calibrate(good: Any, synthetic: Any) -> Calibration:
    """Threshold that best separates validation good scores from validation scores with synthetic defects
    (maximum F1), placed halfway between the lowest flagged score and the next lower score."""
    good = np.asarray(good, dtype=np.float64)
    synthetic = np.asarray(synthetic, dtype=np.float64)
    if good.size == 0 or synthetic.size == 0:
        raise ValueError("calibration needs good and synthetic-defect validation scores")
    scores = np.concatenate([good, synthetic])
    labels = np.concatenate([np.zeros(good.size, int), np.ones(synthetic.size, int)])
    _, flagged = metrics.f1_max(labels, scores)
    lower = scores[scores < flagged]
    threshold = float((flagged + lower.max()) / 2) if lower.size else float(flagged)
    return Calibration(threshold=threshold, low=float(min(scores.min(), threshold)),
                       high=float(max(scores.max(), threshold)), n_good=int(good.size),
                       n_synthetic=int(synthetic.size), validation_auroc=metrics.auroc(labels, scores),
                       good_flagged=float(np.mean(good >= threshold)))
