"""Score new images with a trained model in PyTorch: a CSV of verdicts plus a heatmap overlay and a predicted defect
mask per image, at the image's original size (:mod:`aead.deploy.outputs`; :mod:`aead.deploy.runtime` scores with
the exported ONNX models instead).

Scores are computed exactly as in the evaluation stages (same resizing, maps and image score) and turned
into a verdict with the threshold the evaluation stage calibrated on validation images.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from aead.data.mvtec import resize_image, stack_if_one_shape
from aead.deploy.outputs import Prediction, log_operating_point, score_files
from aead.errors import CheckpointError, ParamsError
from aead.evaluation.calibration import Calibration
from aead.evaluation.evaluate import TrainedModels, require_trained, scoring_batch_size
from aead.models.scoring import AnomalyMapper, Inputs, score_inputs
from aead.params import Params, parse_params, parts_of
from aead.training.loops import autocast_for, setup_compute


def load_calibration(path: Path, method: str, model: str, category: str, params: Params
                     ) -> tuple[Calibration, list[list[float]] | None]:
    """The threshold the evaluation stage fitted for ``model`` and ``category`` with ``method``, and the fused
    map's statistics (None for a single map)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: calibration not found; run the evaluation stages first (dvc repro)")
    record = json.loads(path.read_text())
    if record.get("method") != method:
        raise CheckpointError(f"{path}: calibration is for method '{record.get('method')}', not '{method}'")
    ev = params.evaluate
    recipe = {"image_score": ev.image_score, "smooth_sigma": ev.smooth_sigma,
              "ssim_window_sigma": ev.ssim_window_sigma, "image_size": params.data.image_size,
              "pretrained_smooth_sigma": params.pretrained.smooth_sigma, "parts": list(parts_of(method, ev))}
    for key, value in recipe.items():
        if record.get(key) != value:
            raise CheckpointError(f"{path}: calibrated with {key}={record.get(key)!r} but params say {value!r}; "
                                  "rerun the evaluation stages (dvc repro)")
    try:
        entry = record["models"][model][category]
    except KeyError as err:
        raise CheckpointError(f"{path}: no calibration for model '{model}', category '{category}'") from err
    return Calibration.from_dict(entry), entry.get("fusion")


def recorded_params(models_root: Path, method: str) -> Params:
    """The params the evaluation stage of ``method`` ran with, from its calibration file: the params of the models
    in ``models_root``, whatever params.yaml holds now (an edit, or a failed ``dvc exp run``'s ``-S`` change)."""
    path = models_root / f"calibration-{method}.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: calibration not found; run the evaluation stages first (dvc repro)")
    record = json.loads(path.read_text())
    if "params" not in record:
        raise CheckpointError(f"{path}: written before calibration files recorded their params; rerun the "
                              "evaluation stages (dvc repro), or pass --params")
    return parse_params(record["params"], source=path)


def exported_method(models_root: Path) -> str:
    """The map of the exported detectors (export.method of the run that wrote ``<models_root>/export``)."""
    path = models_root / "export" / "index.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found, so no default map; pass --method or run the export stage")
    return json.loads(path.read_text())["method"]


def load_trained(params: Params, models_root: Path, model: str, category: str, method: str,
                 device: torch.device) -> tuple[AnomalyMapper, Calibration]:
    """The method's map for ``model`` and ``category`` (with the fused map's statistics) and the threshold
    calibrated for it by the evaluation stage."""
    if category not in params.data.categories:
        raise ParamsError(f"--category {category}: not found; the models are trained for "
                          f"{', '.join(params.data.categories)} (data.categories)")
    require_trained(params, method)
    mapper = TrainedModels(params, models_root, device).mapper(method, model, category)
    cal, fusion = load_calibration(models_root / f"calibration-{method}.json", method, model, category, params)
    if len(mapper.parts) > 1:
        if fusion is None:
            raise CheckpointError(f"{models_root / f'calibration-{method}.json'}: no fused-map statistics for "
                                  f"{model}/{category}; rerun the evaluation stages (dvc repro)")
        mapper.fusion.copy_(torch.tensor(fusion, dtype=torch.float64))
    return mapper, cal


def mapper_inputs(mapper: AnomalyMapper, originals: list[np.ndarray], ae_size: int) -> Inputs:
    """Original images (any size) resized to each shape ``mapper`` needs, as the pipeline's prepared images are (the
    pretrained map's at its geometry: one array when they share a working shape, else a list)."""
    ae = np.stack([resize_image(img, ae_size) for img in originals]) if mapper.needs_autoencoder_input else None
    pre = None
    if mapper.needs_pretrained_input:
        assert mapper.geometry is not None
        pre = stack_if_one_shape([resize_image(img, mapper.geometry.of(*img.shape[:2])) for img in originals])
    return Inputs(ae, pre)


def predict(inputs: Iterable[str | Path], model: str, category: str, method: str, params: Params,
            models_root: Path, out_dir: Path, log: Callable[[str], None] = print) -> list[Prediction]:
    """Score every input image with PyTorch; unreadable files are reported in their row and do not stop the others."""
    device = setup_compute(params.model)
    mapper, cal = load_trained(params, models_root, model, category, method, device)
    log_operating_point(cal, f"{model}/{category}, method '{method}'", log)
    autocast, _ = autocast_for(device, params.model.precision, params.model.deterministic)
    batch = scoring_batch_size(params, method)

    def score(originals: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        scored = score_inputs(mapper, mapper_inputs(mapper, originals, params.data.image_size), batch, device,
                              autocast, own_maps=True)
        assert scored.own is not None
        return scored.scores[params.evaluate.image_score], scored.own

    return score_files(inputs, score, cal, batch, category, out_dir, log)
