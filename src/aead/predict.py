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
from aead.calibration import Calibration
from aead.checkpoint import Checkpoint, find_checkpoint, load_checkpoint
from aead.data import IMAGE_EXTENSIONS, Sample, Split, read_image, resize_image
from aead.errors import AeadError, CheckpointError, DataError
from aead.evaluation import require_components, score_split
from aead.params import Params
from aead.training import configure_threads, select_device

CSV_COLUMNS = ("path", "category", "score", "verdict", "raw_score", "heatmap", "mask", "error")


@dataclass
class Prediction:
    path: str
    raw_score: float | None = None
    score: float | None = None
    anomalous: bool | None = None
    heatmap: str = ""
    mask: str = ""
    error: str = ""


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Image files named directly, plus the image files inside named folders (sorted, not recursive)."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
                            and not p.name.startswith("."))
        else:
            files.append(item)
    return files


def load_calibration(path: Path, method: str, model: str, category: str, params: Params) -> Calibration:
    """The threshold the evaluation stage fitted for ``model`` and ``category`` with ``method``."""
    if not path.is_file():
        raise CheckpointError(f"{path}: calibration not found; run the evaluation stages first (dvc repro)")
    record = json.loads(path.read_text())
    if record.get("method") != method:
        raise CheckpointError(f"{path}: calibration is for method '{record.get('method')}', not '{method}'")
    ev = params.evaluate
    recipe = {"image_score": ev.image_score, "smooth_sigma": ev.smooth_sigma,
              "ssim_window_sigma": ev.ssim_window_sigma, "image_size": params.data.image_size}
    for key, value in recipe.items():
        if record.get(key) != value:
            raise CheckpointError(f"{path}: calibrated with {key}={record.get(key)!r} but params say {value!r}; "
                                  "rerun the evaluation stages (dvc repro)")
    try:
        cal = Calibration.from_dict(record["models"][model][category])
    except KeyError as err:
        raise CheckpointError(f"{path}: no calibration for model '{model}', category '{category}'") from err
    return cal


def load_trained(params: Params, models_root: Path, model: str, category: str, method: str,
                 device: torch.device) -> tuple[Checkpoint, Calibration]:
    """The checkpoint serving ``category`` and the threshold calibrated for it by the evaluation stage."""
    path = find_checkpoint(models_root / model, category)
    checkpoint = load_checkpoint(path, device, expect_model=model, expect_image_size=params.data.image_size)
    require_components(checkpoint, path, method)
    cal = load_calibration(models_root / f"calibration-{method}.json", method, model, category, params)
    return checkpoint, cal


def predict(inputs: Iterable[str | Path], model: str, category: str, method: str, params: Params,
            models_root: Path, out_dir: Path, log: Callable[[str], None] = print) -> list[Prediction]:
    """Score every input image; unreadable files are reported in their row and do not stop the others."""
    configure_threads(params.model.num_threads)
    device = select_device(params.model.device)
    checkpoint, cal = load_trained(params, models_root, model, category, method, device)
    warning = cal.warning()
    if warning:
        log(f"warning: {model}/{category}, method '{method}': {warning}")
    files = expand_inputs(inputs)
    if not files:
        raise DataError("no image files given (expected image files or folders of them)")
    size = params.data.image_size
    score = params.evaluate.image_score
    results: list[Prediction] = []
    batch = max(1, params.evaluate.batch_size)
    for start in range(0, len(files), batch):
        chunk = files[start : start + batch]
        originals: list[np.ndarray] = []
        rows: list[Prediction] = []
        for path in chunk:
            try:
                originals.append(read_image(path))
                rows.append(Prediction(str(path)))
            except AeadError as err:
                results.append(Prediction(str(path), error=str(err)))
        if rows:
            split = Split([Sample(r.path, category, "unknown", 0) for r in rows],
                          np.stack([resize_image(img, size) for img in originals]))
            scored = score_split(checkpoint, split, method, params, device)  # type: ignore[arg-type]
            normalized = cal.normalize(scored.scores[score])
            for i, row in enumerate(rows):
                row.raw_score = float(scored.scores[score][i])
                row.score = float(normalized[i])
                row.anomalous = bool(row.raw_score >= cal.threshold)
                stem = f"{start + i:05d}_{Path(row.path).stem}"
                row.heatmap, row.mask = _write_images(out_dir, stem, originals[i], scored.maps[i], cal)
                results.append(row)
        log(f"predict: {min(start + batch, len(files))}/{len(files)} images")
    order = {str(p): i for i, p in enumerate(files)}
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
    return {"path": r.path, "category": category, "score": "" if r.score is None else r.score,
            "verdict": verdict, "raw_score": "" if r.raw_score is None else r.raw_score,
            "heatmap": r.heatmap, "mask": r.mask, "error": r.error}
