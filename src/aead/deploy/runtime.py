"""Scoring with the exported ONNX models and ONNX Runtime alone, without PyTorch: what runs on an inspection PC.

The export stage writes ``<model>-<category>.onnx`` and ``index.json`` (:mod:`aead.deploy.export`); this module reads
only those, numpy, Pillow and onnxruntime. ``aead predict --runtime onnxruntime`` scores with it and writes the same
outputs as the PyTorch runtime (:mod:`aead.deploy.outputs`); verdicts use the threshold and calibration in the index.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from aead.deploy.outputs import Prediction, log_operating_point, score_files
from aead.errors import CheckpointError, ParamsError
from aead.evaluation.calibration import Calibration


def read_index(export_dir: Path) -> dict[str, Any]:
    """The export stage's ``index.json`` in ``export_dir``."""
    path = export_dir / "index.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; run the export stage (dvc repro export)")
    return json.loads(path.read_text())


def index_key(index: dict[str, Any], export_dir: Path, category: str, model: str | None) -> str:
    """The index's ``model/category`` key of the detector asked for (``model`` None: the first model exported for
    ``category``, as the PyTorch runtime's default)."""
    keys = [k for k in index["files"] if k.split("/", 1)[1] == category]
    if not keys:
        found = sorted({k.split("/", 1)[1] for k in index["files"]})
        raise ParamsError(f"--category {category}: not exported; {export_dir / 'index.json'} has {', '.join(found)}")
    if model is None:
        return keys[0]
    key = f"{model}/{category}"
    if key not in keys:
        raise ParamsError(f"--model {model}: not exported for {category}; {export_dir / 'index.json'} has "
                          f"{', '.join(k.split('/', 1)[0] for k in keys)} (map '{index['method']}')")
    return key


class OnnxDetector:
    """One exported detector in an ONNX Runtime session. Calling it with uint8 (N, H, W, 3) images (one size per call)
    returns ``(score, raw_score, anomaly_map)`` as the export documents; :attr:`calibration` is its threshold.
    ``threads``: ONNX Runtime's intra-op threads (0: one per physical core); ``spinning``: whether they spin waiting for
    work after a call (lower latency, but they take the cores from other work for a while)."""

    def __init__(self, export_dir: Path, category: str, model: str | None = None, threads: int = 0,
                 spinning: bool = True) -> None:
        index = read_index(export_dir)
        self.key = index_key(index, export_dir, category, model)
        self.method: str = index["method"]
        name = index["files"][self.key].get("onnx")
        if name is None:
            raise CheckpointError(f"{export_dir / 'index.json'}: exported as {', '.join(index['formats'])} only; add "
                                  "onnx to export.formats in params.yaml and rerun the export stage (dvc repro)")
        path = export_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path}: not found although {export_dir / 'index.json'} lists it; rerun the export "
                                  "stage (dvc repro), or dvc pull")
        self.calibration = Calibration.from_dict(index["calibrations"][self.key])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        score, raw, amap = self.session.run(None, {"images": np.ascontiguousarray(images, dtype=np.uint8)})
        return score, raw, amap

    def score_images(self, originals: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Raw scores (N,) and each image's anomaly map (h, w) at its working shape, of images of any sizes: runs of
        equal size go in one batch."""
        raw = np.empty(len(originals), dtype=np.float64)
        maps: list[np.ndarray] = []
        start = 0
        while start < len(originals):
            end = start + 1
            while end < len(originals) and originals[end].shape == originals[start].shape:
                end += 1
            _, raw[start:end], batch_maps = self(np.stack(originals[start:end]))
            maps.extend(batch_maps)
            start = end
        return raw, maps


def predict_onnx(inputs: Iterable[str | Path], category: str, export_dir: Path, out_dir: Path, model: str | None = None,
                 method: str | None = None, batch_size: int = 8, threads: int = 0,
                 log: Callable[[str], None] = print) -> list[Prediction]:
    """Score every input image with the exported ONNX model of ``category`` (and ``model``); ``method``, if given,
    must be the exported map. Unreadable files are reported in their row and do not stop the others."""
    detector = OnnxDetector(export_dir, category, model, threads)
    if method is not None and method != detector.method:
        raise ParamsError(f"--method {method}: the ONNX models in {export_dir} compute map '{detector.method}' "
                          "(export.method); export that map, or use --runtime torch")
    log_operating_point(detector.calibration, f"{detector.key}, method '{detector.method}' (ONNX Runtime)", log)
    return score_files(inputs, detector.score_images, detector.calibration, batch_size, category, out_dir, log)
