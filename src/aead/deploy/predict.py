"""Score new images with a trained model: a CSV of verdicts plus a heatmap overlay and a predicted defect
mask per image, at the image's original size.

Scores are computed exactly as in the evaluation stages (same resizing, maps and image score) and turned
into a verdict with the threshold the evaluation stage calibrated on validation images.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from aead import io
from aead.evaluation.calibration import Calibration
from aead.data.mvtec import IMAGE_EXTENSIONS, read_image, resize_image
from aead.errors import AeadError, CheckpointError, DataError, ParamsError
from aead.evaluation.evaluate import TrainedModels, require_trained, scoring_batch_size
from aead.params import Params, parse_params, parts_of
from aead.models.scoring import AnomalyMapper, Inputs, score_inputs
from aead.training.loops import autocast_for, setup_compute

CSV_COLUMNS = ("path", "relative_path", "category", "score", "verdict", "raw_score", "heatmap", "mask", "error")


@dataclass(frozen=True)
class InputImage:
    """An image to score: its path, and the path its outputs are named after: from the folder it was found in,
    that folder's name included (``test/good/000.png`` for a folder ``test`` given), or its name when it was given
    directly."""

    path: Path
    relative: Path


@dataclass
class Prediction:
    path: str
    relative_path: str = ""
    raw_score: float | None = None
    score: float | None = None
    anomalous: bool | None = None
    heatmap: str = ""
    mask: str = ""
    error: str = ""


def expand_inputs(inputs: Iterable[str | Path]) -> list[InputImage]:
    """Image files named directly, and every image file under named folders, recursively (hidden files and
    folders skipped), in sorted order. Where two images would get the same relative path (``a/x.png`` and
    ``b/x.png`` given directly), the later ones get ``~2``, ``~3`` ... before the suffix, so no output is
    overwritten; the CSV keeps each image's own path next to it."""
    found: list[InputImage] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(part.startswith(".") for part in p.relative_to(item).parts))
            found += [InputImage(p, Path(item.resolve().name) / p.relative_to(item)) for p in files]
        else:
            found.append(InputImage(item, Path(item.name)))
    taken: set[Path] = set()
    unique = []
    for image in found:
        relative, n = image.relative, 1
        while relative in taken:
            n += 1
            relative = image.relative.with_name(f"{image.relative.stem}~{n}{image.relative.suffix}")
        taken.add(relative)
        unique.append(InputImage(image.path, relative))
    return unique


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
    """Original images (any size) resized to each shape ``mapper`` needs, as the pipeline's prepared images are."""
    ae = np.stack([resize_image(img, ae_size) for img in originals]) if mapper.needs_autoencoder_input else None
    pre = (np.stack([resize_image(img, mapper.out_shape) for img in originals])
           if mapper.needs_pretrained_input else None)
    return Inputs(ae, pre)


def predict(inputs: Iterable[str | Path], model: str, category: str, method: str, params: Params,
            models_root: Path, out_dir: Path, log: Callable[[str], None] = print) -> list[Prediction]:
    """Score every input image; unreadable files are reported in their row and do not stop the others."""
    device = setup_compute(params.model)
    mapper, cal = load_trained(params, models_root, model, category, method, device)
    warning = cal.warning()
    if warning:
        log(f"warning: {model}/{category}, method '{method}': {warning}")
    guarantee = cal.guarantee()
    if guarantee:
        log(f"predict: {model}/{category}, method '{method}': {guarantee}")
    inputs = list(inputs)
    files = expand_inputs(inputs)
    if not files:
        raise DataError(f"no image files in {', '.join(map(str, inputs))} (expected image files or folders holding "
                        f"{', '.join(IMAGE_EXTENSIONS)} files, searched recursively)")
    log(f"predict: {len(files)} images from {', '.join(map(str, inputs))} (folders searched recursively)")
    score = params.evaluate.image_score
    autocast, _ = autocast_for(device, params.model.precision, params.model.deterministic)
    results: list[Prediction] = []
    batch = scoring_batch_size(params, method)
    for start in range(0, len(files), batch):
        chunk = files[start : start + batch]
        originals: list[np.ndarray] = []
        rows: list[Prediction] = []
        for image in chunk:
            try:
                originals.append(read_image(image.path))
                rows.append(Prediction(str(image.path), str(image.relative)))
            except AeadError as err:
                results.append(Prediction(str(image.path), str(image.relative), error=str(err)))
        if rows:
            scored = score_inputs(mapper, mapper_inputs(mapper, originals, params.data.image_size), batch, device,
                                  autocast)
            normalized = cal.normalize(scored.scores[score])
            for i, row in enumerate(rows):
                row.raw_score = float(scored.scores[score][i])
                row.score = float(normalized[i])
                row.anomalous = bool(row.raw_score >= cal.threshold)
                stem = str(Path(row.relative_path).with_suffix(""))
                row.heatmap, row.mask = _write_images(out_dir, stem, originals[i], scored.maps[i], cal)
                results.append(row)
        log(f"predict: {min(start + batch, len(files))}/{len(files)} images")
    order = {str(image.path): i for i, image in enumerate(files)}
    results.sort(key=lambda r: order[r.path])
    io.write_csv(out_dir / "predictions.csv", (_row(r, category) for r in results), CSV_COLUMNS)
    return results


def _write_images(out_dir: Path, stem: str, image: np.ndarray, amap: np.ndarray, cal: Calibration) -> tuple[str, str]:
    """Overlay and mask PNGs at the image's original size; the mask marks pixels whose map value reaches
    the calibrated threshold (exact for the `max` image score: an image is flagged iff a pixel is)."""
    h, w = image.shape[:2]
    full = np.asarray(Image.fromarray(amap.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR))
    heat = np.clip(cal.normalize(full), 0.0, 1.0)
    colour = np.stack([heat, 1.0 - np.abs(heat - 0.5) * 2, 1.0 - heat], axis=-1) * 255.0
    overlay = (0.55 * image + 0.45 * colour).round().clip(0, 255).astype(np.uint8)
    mask = ((full >= cal.threshold) * 255).astype(np.uint8)
    heat_path, mask_path = out_dir / f"{stem}_heatmap.png", out_dir / f"{stem}_mask.png"
    for path, array in ((heat_path, overlay), (mask_path, mask)):
        with io.atomic_path(path) as tmp:
            Image.fromarray(array).save(tmp, format="PNG")
    return str(heat_path), str(mask_path)


def _row(r: Prediction, category: str) -> dict[str, Any]:
    verdict = "" if r.anomalous is None else ("anomalous" if r.anomalous else "good")
    return {"path": r.path, "relative_path": r.relative_path, "category": category, "score": "" if r.score is None else r.score,
            "verdict": verdict, "raw_score": "" if r.raw_score is None else r.raw_score,
            "heatmap": r.heatmap, "mask": r.mask, "error": r.error}
