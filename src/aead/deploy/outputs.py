"""What ``aead predict`` writes, whichever runtime scores (PyTorch or ONNX Runtime): the input images found, one
row per image in ``predictions.csv``, and per image a heatmap overlay and a predicted defect mask at its own size.
numpy and Pillow only, no torch."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from aead import io
from aead.data.images import IMAGE_EXTENSIONS, read_image
from aead.errors import AeadError, DataError
from aead.evaluation.calibration import Calibration

CSV_COLUMNS = ("path", "relative_path", "category", "score", "verdict", "raw_score", "heatmap", "mask", "error")

# scores a list of decoded images: (raw image scores (N,), each image's anomaly map (h, w) at its working shape)
ScoreImages = Callable[[list[np.ndarray]], tuple[np.ndarray, Sequence[np.ndarray]]]


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


def log_operating_point(cal: Calibration, what: str, log: Callable[[str], None]) -> None:
    """Say what the threshold guarantees, and warn where it falls short of what was asked."""
    warning = cal.warning()
    if warning:
        log(f"warning: {what}: {warning}")
    guarantee = cal.guarantee()
    if guarantee:
        log(f"predict: {what}: {guarantee}")


def score_files(inputs: Iterable[str | Path], score: ScoreImages, cal: Calibration, batch_size: int, category: str,
                out_dir: Path, log: Callable[[str], None] = print) -> list[Prediction]:
    """Find the input images, score them ``batch_size`` at a time with ``score``, judge them by the calibrated
    threshold, write their heatmaps, masks and ``predictions.csv``; unreadable files are reported in their row and
    do not stop the others."""
    inputs = list(inputs)
    files = expand_inputs(inputs)
    if not files:
        raise DataError(f"no image files in {', '.join(map(str, inputs))} (expected image files or folders holding "
                        f"{', '.join(IMAGE_EXTENSIONS)} files, searched recursively)")
    log(f"predict: {len(files)} images from {', '.join(map(str, inputs))} (folders searched recursively)")
    results: list[Prediction] = []
    for start in range(0, len(files), batch_size):
        originals: list[np.ndarray] = []
        rows: list[Prediction] = []
        for image in files[start : start + batch_size]:
            try:
                originals.append(read_image(image.path))
                rows.append(Prediction(str(image.path), str(image.relative)))
            except AeadError as err:
                results.append(Prediction(str(image.path), str(image.relative), error=str(err)))
        if rows:
            raw, maps = score(originals)
            normalized = cal.normalize(raw)
            for i, row in enumerate(rows):
                row.raw_score = float(raw[i])
                row.score = float(normalized[i])
                row.anomalous = bool(row.raw_score >= cal.threshold)
                stem = str(Path(row.relative_path).with_suffix(""))
                row.heatmap, row.mask = write_images(out_dir, stem, originals[i], maps[i], cal)
                results.append(row)
        log(f"predict: {min(start + batch_size, len(files))}/{len(files)} images")
    order = {str(image.path): i for i, image in enumerate(files)}
    results.sort(key=lambda r: order[r.path])
    io.write_csv(out_dir / "predictions.csv", (csv_row(r, category) for r in results), CSV_COLUMNS)
    return results


def write_images(out_dir: Path, stem: str, image: np.ndarray, amap: np.ndarray, cal: Calibration) -> tuple[str, str]:
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


def csv_row(r: Prediction, category: str) -> dict[str, Any]:
    verdict = "" if r.anomalous is None else ("anomalous" if r.anomalous else "good")
    return {"path": r.path, "relative_path": r.relative_path, "category": category, "score": "" if r.score is None else r.score,
            "verdict": verdict, "raw_score": "" if r.raw_score is None else r.raw_score,
            "heatmap": r.heatmap, "mask": r.mask, "error": r.error}
