"""Self-contained detectors, one per model and category, in two formats (``export.formats``):

- ``pt2``: a ``torch.export`` program; ``torch.export.load(path).module()`` scores images with ``torch`` alone;
- ``onnx``: an ONNX model (opset 18+) that ONNX Runtime runs without PyTorch or this package
  (:mod:`aead.deploy.runtime`, ``aead predict --runtime onnxruntime``).

Both take one input, ``images``: uint8 (N, H, W, 3) RGB, any batch size and any height and width (all images of one
batch the same size; repeat a grayscale image to 3 channels first), and return ``(score, raw_score, anomaly_map)``:
(N,) float64 scores normalised so the calibrated threshold is 0.5 (0.5 and above = anomalous), (N,) float64 raw image
scores, and (N, h, w) float32 anomaly maps at the input's working shape: for the pretrained map its
``geometry`` in the index (with ``scale``, the input's own size times one factor, so a long strip gets a long map),
for the others ``map_shape``.
The graph resizes and computes maps with the same functions as the pipeline (``data.resize_batch``,
:class:`aead.models.scoring.AnomalyMapper`, :func:`aead.evaluation.calibration.normalize_scores`), so its scores equal
those of the evaluation stages and of `aead predict` up to float rounding. The memory banks travel inside the files as
constants (``max_bank_size`` patches at most).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram

from aead import io
from aead.data.mvtec import Geometry, resize_batch
from aead.deploy.predict import load_trained
from aead.evaluation.calibration import Calibration, normalize_scores
from aead.models import maps
from aead.models.scoring import AnomalyMapper
from aead.params import Params, models_of
from aead.training.numerics import memory_format

MAX_SIDE = 16384  # the largest image side an exported detector accepts
MAX_BATCH = 4096  # the largest batch it accepts
ONNX_OPSET = 18  # the opset the ONNX models are written in (ONNX Runtime 1.14 and later run it)
INPUT_NAMES = ("images",)
OUTPUT_NAMES = ("score", "raw_score", "anomaly_map")


class Detector(nn.Module):
    """Preprocessing, anomaly map (:class:`aead.models.scoring.AnomalyMapper`, holding only the parts its method uses),
    image score and score normalisation in one module: uint8 (N, H, W, 3) images in, ``(score, raw_score,
    anomaly_map)`` out."""

    def __init__(self, mapper: AnomalyMapper, image_size: int, image_score: str, calibration: Calibration) -> None:
        super().__init__()
        self.mapper = mapper.eval()
        self.image_size = image_size
        self.image_score = image_score
        self.calibration = calibration

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = images.permute(0, 3, 1, 2).float()
        x_ae = x_pre = None
        if self.mapper.needs_autoencoder_input:
            size = (self.image_size, self.image_size)
            x_ae = (resize_batch(x, size) / 255.0).contiguous(memory_format=memory_format())
        if self.mapper.needs_pretrained_input:
            shape = working_shape_of(self.mapper.geometry, x.shape[2], x.shape[3])
            x_pre = (resize_batch(x, shape) / 255.0).contiguous(memory_format=memory_format())
        amap = self.mapper(x_ae, x_pre)
        raw = maps.image_scores(amap, smooth_sigma=0.0)[self.image_score].double()
        cal = self.calibration
        return normalize_scores(raw, cal.threshold, cal.low, cal.high), raw, amap


def working_shape_of(geometry: Geometry | None, height: Any, width: Any) -> tuple[Any, Any]:
    """The working shape of an input of ``height`` x ``width`` (ints, or an exported graph's symbolic sizes), as
    :meth:`Geometry.of` computes it. At one pixel scale the sides are computed as integer tensors and read back as
    new unbacked sizes checked to lie in range: the backbone's shapes then stay simple multiples of those sizes, where
    the expression of the rounded scale carried through every layer makes ``torch.export`` stall."""
    assert geometry is not None
    if geometry.mode == "shape":
        return geometry.shape
    if isinstance(height, int) and isinstance(width, int):
        return geometry.of(height, width)
    m, num, den = geometry.multiple, geometry.num, geometry.den
    sides = []
    for n in (height, width):
        k = ((torch.full((), n, dtype=torch.int64) * (2 * num) + den * m) // (2 * den * m)).clamp(min=1).item()
        torch._check(k >= 1)
        torch._check(k <= MAX_SIDE)
        sides.append(k * m)
    return sides[0], sides[1]


def build_detector(params: Params, models_root: Path, model: str, category: str, method: str) -> Detector:
    """The detector for one trained model and category, with the evaluation stage's calibration."""
    mapper, cal = load_trained(params, models_root, model, category, method, torch.device("cpu"))
    return Detector(mapper, params.data.image_size, params.evaluate.image_score, cal).eval()


def operating_point_record(cal: Calibration) -> dict[str, Any]:
    """The threshold an exported detector applies (raw score; the normalised score's is 0.5), the false-alarm rate it
    guarantees (see :mod:`aead.evaluation.calibration`), and the pixel threshold ``aead predict`` draws its defect
    masks with (the same raw value, applied to the anomaly map after a bilinear resize to the input image's size). The
    whole calibration, normalisation range included, is the index's ``calibrations`` entry."""
    return {"raw_threshold": cal.threshold, "normalized_threshold": 0.5, "raw_pixel_threshold": cal.threshold,
            **cal.guarantee_record(), "bound_confidence": cal.bound_confidence}


def example_images(side: int) -> Tensor:
    """The example batch the detectors are traced with: two images of a size unlike any special case."""
    return torch.zeros((2, side + 13, side + 7, 3), dtype=torch.uint8)


def export_program(detector: Detector, example_side: int) -> ExportedProgram:
    """``detector`` as a ``torch.export`` program for any batch (1 to :data:`MAX_BATCH`) of images of any height and
    width (8 to :data:`MAX_SIDE` px)."""
    dims = {0: Dim("batch", min=1, max=MAX_BATCH), 1: Dim("height", min=8, max=MAX_SIDE),
            2: Dim("width", min=8, max=MAX_SIDE)}
    return torch.export.export(detector, (example_images(example_side),), dynamic_shapes={"images": dims})


def save_onnx(program: ExportedProgram, example_side: int, path: Path) -> None:
    """Convert ``program`` to ONNX (weights inside the one file) and save it to ``path``."""
    noisy = logging.getLogger("onnx_ir._convenience")  # warns of an empty attribute list the exporter writes
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        onnx_program = torch.onnx.export(program, (example_images(example_side),), dynamo=True, optimize=True,
                                         opset_version=ONNX_OPSET, input_names=list(INPUT_NAMES),
                                         output_names=list(OUTPUT_NAMES), verbose=False)
    finally:
        noisy.setLevel(level)
    onnx_program.save(str(path), external_data=False)


def export_all(params: Params, models_root: Path, out_dir: Path, method: str) -> dict[str, Any]:
    """Export one detector per model and category and format into ``out_dir`` (replaced whole), with an
    ``index.json`` that names the files and gives each detector's operating point and calibration."""
    formats = list(params.export.formats)
    index: dict[str, Any] = {"method": method, "image_score": params.evaluate.image_score, "formats": formats,
                             "inputs": {INPUT_NAMES[0]: "uint8 (batch, height, width, 3) RGB"},
                             "outputs": {"score": "float64 (batch,), threshold 0.5",
                                         "raw_score": "float64 (batch,)", "anomaly_map": "float32 (batch, h, w)"},
                             "files": {}, "operating_points": {}, "calibrations": {}}
    side = params.data.image_size
    with io.atomic_dir(out_dir) as tmp, torch.no_grad():
        for model in models_of(method, params.evaluate):
            for category in params.data.categories:
                key = f"{model}/{category}"
                detector = build_detector(params, models_root, model, category, method)
                program = export_program(detector, side)
                files = {}
                if "pt2" in formats:
                    files["pt2"] = f"{model}-{category}.pt2"
                    torch.export.save(program, str(tmp / files["pt2"]))
                if "onnx" in formats:
                    files["onnx"] = f"{model}-{category}.onnx"
                    save_onnx(program, side, tmp / files["onnx"])
                index["files"][key] = files
                geometry = detector.mapper.geometry
                index["operating_points"][key] = {
                    **operating_point_record(detector.calibration),
                    **({"map_shape": list(detector.mapper.out_shape)} if geometry is None else
                       {"geometry": geometry.to_dict()})}
                index["calibrations"][key] = detector.calibration.to_dict()
        (tmp / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index
