"""Heatmap panels for a few test images per category and defect type."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


from aead import io
from aead.evaluation.calibration import Calibration
from aead.evaluation.evaluate import CategoryResult
from aead.evaluation.plots import HeatmapPanels


def write_heatmaps(out_dir: Path, results: dict[str, dict[str, CategoryResult]],
                   calibration: dict[str, dict[str, Calibration]], score: str, map_title: str,
                   log: Callable[[str], None] = print) -> int:
    """Write one panel PNG per kept image to ``out_dir/<model>/<category>/<defect>_<stem>.png`` (the folder is
    replaced whole), its map on the normalised score scale of ``calibration``, titled with ``map_title`` (which map
    it is). Returns the number of panels."""
    count = 0
    panels = HeatmapPanels()
    with io.atomic_dir(out_dir) as tmp:
        try:
            count = _write_panels(panels, tmp, results, calibration, score, map_title)
        finally:
            panels.close()
    log(f"wrote {count} heatmap panels to {out_dir}")
    return count


def _write_panels(panels: HeatmapPanels, folder: Path, results: dict[str, dict[str, CategoryResult]],
                  calibration: dict[str, dict[str, Calibration]], score: str, map_title: str) -> int:
    count = 0
    for model, per_cat in results.items():
        for cat, res in per_cat.items():
            cal = calibration[model][cat]
            for i, image in sorted(res.images.items()):
                smp = res.samples[i]
                mask = res.masks[i] if res.masks is not None and res.has_mask[i] else None
                value = float(cal.normalize(res.scores[score][i : i + 1])[0])
                verdict = "anomalous" if res.scores[score][i] >= cal.threshold else "good"
                truth = "good" if smp.label == 0 else f"defect: {smp.defect_type}"
                title = (f"{map_title}\n{model} / {cat} / {Path(smp.path).name} ({truth})\n"
                         f"normalised '{score}' score {value:.2f} {'>=' if verdict == 'anomalous' else '<'} "
                         f"threshold 0.50 -> {verdict}")
                panels.write(folder / model / cat / f"{smp.defect_type}_{Path(smp.path).stem}.png", image,
                             res.recon.get(i), cal.normalize(res.maps[i]), mask, title)
                count += 1
    return count
