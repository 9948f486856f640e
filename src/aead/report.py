"""Heatmap panels for a few test images per category and defect type."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from aead import io
from aead.data import read_split
from aead.evaluation import CategoryResult
from aead.plots import heatmap_panel


def write_heatmaps(out_dir: Path, results: dict[str, dict[str, CategoryResult]], prepared_dir: str | Path,
                   log: Callable[[str], None] = print) -> int:
    """Write one panel PNG per kept image to ``out_dir/<model>/<category>/<defect>_<stem>.png``
    (the folder is replaced whole). Returns the number of panels."""
    test = read_split(prepared_dir, "test")
    count = 0
    with io.atomic_dir(out_dir) as tmp:
        for model, per_cat in results.items():
            for cat, res in per_cat.items():
                if not res.recon:
                    continue
                images = test.select([cat]).images
                vmax = float(np.quantile(res.maps, 0.999)) or 1.0
                for i, recon in sorted(res.recon.items()):
                    smp = res.samples[i]
                    mask = res.masks[i] if res.masks is not None and res.has_mask[i] else None
                    name = f"{smp.defect_type}_{Path(smp.path).stem}.png"
                    heatmap_panel(tmp / model / cat / name, np.asarray(images[i]), recon, res.maps[i], mask,
                                  f"{model} / {cat} / {smp.defect_type} / {Path(smp.path).name}", vmax)
                    count += 1
    log(f"wrote {count} heatmap panels to {out_dir}")
    return count
