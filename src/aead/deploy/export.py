"""Self-contained detectors in ``torch.export`` format: ``torch.export.load(path).module()`` gives a module that
scores an image with ``torch`` alone, without this package.

Input: one uint8 RGB image tensor (H, W, 3) of any size (repeat a grayscale image to 3 channels first).
Output: ``(score, raw_score, anomaly_map)``: the score normalised so the calibrated threshold is 0.5 (above
0.5 = anomalous), the raw image score, and the anomaly map (at the map's working shape).
The graph resizes and computes maps with the same functions as the pipeline (``data.resize_batch``,
:class:`aead.models.scoring.AnomalyMapper`), so its scores equal those of the evaluation stages and of `aead predict`.
The memory banks travel inside the file as tensors (the bank of ``max_bank_size`` patches at most).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim

from aead import io

from aead.models import maps
from aead.evaluation.calibration import Calibration, normalize_scores
from aead.data.mvtec import resize_batch
from aead.training.numerics import memory_format
from aead.params import Params, models_of
from aead.deploy.predict import load_trained
from aead.models.scoring import AnomalyMapper


class Detector(nn.Module):
    """Preprocessing, anomaly map (:class:`aead.models.scoring.AnomalyMapper`, holding only the parts its method uses),
    image score and score normalisation in one module."""

    def __init__(self, mapper: AnomalyMapper, image_size: int, image_score: str, calibration: Calibration) -> None:
        super().__init__()
        self.mapper = mapper.eval()
        self.image_size = image_size
        self.image_score = image_score
        self.calibration = calibration
        self.register_buffer("cal", calibration.bounds())

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = image.permute(2, 0, 1).unsqueeze(0).float()
        x_ae = x_pre = None
        if self.mapper.needs_autoencoder_input:
            size = (self.image_size, self.image_size)
            x_ae = (resize_batch(x, size) / 255.0).contiguous(memory_format=memory_format())
        if self.mapper.needs_pretrained_input:
            x_pre = (resize_batch(x, self.mapper.out_shape) / 255.0).contiguous(memory_format=memory_format())
        amap = self.mapper(x_ae, x_pre)
        raw = maps.image_scores(amap, smooth_sigma=0.0)[self.image_score][0].double()
        score = normalize_scores(raw, self.cal)
        return score, raw, amap[0]


def build_detector(params: Params, models_root: Path, model: str, category: str, method: str) -> Detector:
    """The detector for one trained model and category, with the evaluation stage's calibration."""
    mapper, cal = load_trained(params, models_root, model, category, method, torch.device("cpu"))
    return Detector(mapper, params.data.image_size, params.evaluate.image_score, cal).eval()


def operating_point_record(cal: Calibration) -> dict[str, Any]:
    """The threshold an exported detector applies (raw score; the normalised score's is 0.5), the false-alarm rate it
    guarantees (see :mod:`aead.evaluation.calibration`), and the pixel threshold ``aead predict`` draws its defect masks with:
    the same raw value, applied to the anomaly map after a bilinear resize to the input image's size."""
    return {"raw_threshold": cal.threshold, "normalized_threshold": 0.5, "raw_pixel_threshold": cal.threshold,
            **cal.guarantee_record(), "bound_confidence": cal.bound_confidence}


MAX_SIDE = 16384  # the largest image side an exported detector accepts


def export_detector(detector: Detector, path: Path, example_side: int) -> None:
    """Export ``detector`` with ``torch.export`` for images of any height and width (8 to :data:`MAX_SIDE` px) and
    save it to ``path``."""
    example = torch.zeros((example_side + 13, example_side + 7, 3), dtype=torch.uint8)
    sides = {0: Dim("height", min=8, max=MAX_SIDE), 1: Dim("width", min=8, max=MAX_SIDE)}
    program = torch.export.export(detector, (example,), dynamic_shapes={"image": sides})
    torch.export.save(program, str(path))


def export_all(params: Params, models_root: Path, out_dir: Path, method: str) -> dict[str, Any]:
    """Export one detector per model and category into ``out_dir`` (replaced whole), with an ``index.json``."""
    index: dict[str, Any] = {"method": method, "image_score": params.evaluate.image_score, "files": {},
                             "operating_points": {}}
    with io.atomic_dir(out_dir) as tmp, torch.no_grad():
        for model in models_of(method, params.evaluate):
            for category in params.data.categories:
                detector = build_detector(params, models_root, model, category, method)
                path = tmp / f"{model}-{category}.pt2"
                export_detector(detector, path, params.data.image_size)
                index["files"][f"{model}/{category}"] = path.name
                index["operating_points"][f"{model}/{category}"] = {
                    **operating_point_record(detector.calibration), "map_shape": list(detector.mapper.out_shape)}
        (tmp / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index
