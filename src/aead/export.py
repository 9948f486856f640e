"""A self-contained TorchScript detector: load it with ``torch.jit.load`` and call it on an image, without
this package.

Input: one uint8 RGB image tensor (H, W, 3) of any size (repeat a grayscale image to 3 channels first).
Output: ``(score, raw_score, anomaly_map)``: the score normalised so the calibrated threshold is 0.5 (above
0.5 = anomalous), the raw image score, and the (image_size, image_size) anomaly map.
The graph resizes and computes maps with the same functions as the pipeline (``data.resize_batch``,
``evaluation.anomaly_maps``), so its scores equal those of the evaluation stages and of `aead predict`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from aead import io, maps
from aead.calibration import Calibration, normalize_scores
from aead.data import resize_batch
from aead.evaluation import anomaly_maps
from aead.params import BANK_METHODS, HEAD_METHODS, Params
from aead.predict import load_trained
from aead.torch_model import PatchMemory


class Detector(nn.Module):
    """Preprocessing, autoencoder, anomaly map (with the segmentation head for ``seg`` and ``fused``, the memory
    bank for ``knn`` and ``fused``), image score and score normalisation in one module."""

    def __init__(self, model: nn.Module, head: nn.Module | None, method: str, image_size: int, image_score: str,
                 smooth_sigma: float, window_sigma: float, calibration: Calibration,
                 memory: PatchMemory | None = None) -> None:
        super().__init__()
        self.model = model.eval()
        self.head = None if head is None else head.eval()  # only given (and saved) where the map uses it
        self.memory = None if memory is None else memory.eval()
        self.method = method
        self.image_size = image_size
        self.image_score = image_score
        self.smooth_sigma = smooth_sigma
        self.window_sigma = window_sigma
        self.register_buffer("cal", calibration.bounds())

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = resize_batch(image.permute(2, 0, 1).unsqueeze(0).float(), self.image_size) / 255.0
        x = x.contiguous(memory_format=torch.channels_last)
        recon = self.model(x).float()
        amap = anomaly_maps(self.method, x, recon, self.smooth_sigma, self.window_sigma,  # type: ignore[arg-type]
                            self.head, self.memory, self.model.encoder)
        raw = maps.image_scores(amap, smooth_sigma=0.0)[self.image_score][0].double()
        score = normalize_scores(raw, self.cal)
        return score, raw, amap[0]


def build_detector(params: Params, models_root: Path, model: str, category: str, method: str) -> Detector:
    """The detector for one trained model and category, with the evaluation stage's calibration."""
    checkpoint, cal = load_trained(params, models_root, model, category, method, torch.device("cpu"))
    ev = params.evaluate
    head = checkpoint.head if method in HEAD_METHODS else None
    if head is not None:
        head = head.to(memory_format=torch.channels_last)
    memory = checkpoint.memory if method in BANK_METHODS else None
    return Detector(checkpoint.model.to(memory_format=torch.channels_last), head, method, params.data.image_size,
                    ev.image_score, ev.smooth_sigma, ev.ssim_window_sigma, cal, memory).eval()


def export_all(params: Params, models_root: Path, out_dir: Path, method: str) -> dict[str, Any]:
    """Trace and save one TorchScript detector per model and category into ``out_dir`` (replaced whole)."""
    example = torch.zeros((params.data.image_size + 13, params.data.image_size + 7, 3), dtype=torch.uint8)
    index: dict[str, Any] = {"method": method, "image_score": params.evaluate.image_score, "files": {}}
    with io.atomic_dir(out_dir) as tmp, torch.no_grad():
        for model in ("baseline", "multiscale"):
            for category in params.data.categories:
                detector = build_detector(params, models_root, model, category, method)
                with warnings.catch_warnings():  # shape checks are constant for the fixed model input size
                    warnings.simplefilter("ignore")
                    traced = torch.jit.trace(detector, example, check_trace=False)
                path = tmp / f"{model}-{category}.pt"
                traced.save(str(path))
                index["files"][f"{model}/{category}"] = path.name
        (tmp / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index
