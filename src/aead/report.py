"""Heatmap panels for a few test images per category and defect type."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from aead import io
from aead.data import Split, read_split
from aead.evaluation import CategoryResult
from aead.plots import HeatmapPanels


def write_heatmaps(out_dir: Path, results: dict[str, dict[str, CategoryResult]], prepared_dir: str | Path,
                   log: Callable[[str], None] = print) -> int:
    """Write one panel PNG per kept image to ``out_dir/<model>/<category>/<defect>_<stem>.png``
    (the folder is replaced whole). Returns the number of panels."""
    test = read_split(prepared_dir, "test")
    count = 0
    panels = HeatmapPanels()
    with io.atomic_dir(out_dir) as tmp:
        try:
            count = _write_panels(panels, tmp, results, test)
        finally:
            panels.close()
    log(f"wrote {count} heatmap panels to {out_dir}")
    return count


def _write_panels(panels: HeatmapPanels, folder: Path, results: dict[str, dict[str, CategoryResult]],
                  test: Split) -> int:
    count = 0
    for model, per_cat in results.items():
        for cat, res in per_cat.items():
            if not res.recon:
                continue
            images = test.select([cat]).images
            vmin = min(0.0, float(res.maps.min()))  # fused maps are centred on the validation mean: they go below 0
            vmax = float(np.quantile(res.maps, 0.999))
            vmax = vmax if vmax > vmin else vmin + 1.0
            for i, recon in sorted(res.recon.items()):
                smp = res.samples[i]
                mask = res.masks[i] if res.masks is not None and res.has_mask[i] else None
                name = f"{smp.defect_type}_{Path(smp.path).stem}.png"
                panels.write(folder / model / cat / name, np.asarray(images[i]), recon, res.maps[i], mask,
                             f"{model} / {cat} / {smp.defect_type} / {Path(smp.path).name}", vmax, vmin)
                count += 1
    return count
