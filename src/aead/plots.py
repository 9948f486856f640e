"""Figures: the model comparison (like the seed's model_comparison.png) and per-image heatmap panels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from aead import io  # noqa: E402


def comparison_figure(path: Path, evaluation_metrics: dict[str, Any], results: dict[str, dict[str, Any]],
                      score: str, title: str) -> None:
    """Score distributions (good vs anomalous) per model, per-category AUROC bars, and a metrics table."""
    models = [m for m in results if m in evaluation_metrics]
    fig = plt.figure(figsize=(5 * len(models) + 6, 8.5))
    grid = fig.add_gridspec(2, len(models) + 1, height_ratios=[1.2, 1])
    for i, model in enumerate(models):
        ax = fig.add_subplot(grid[0, i])
        good = np.concatenate([r.scores[score][r.labels == 0] for r in results[model].values()])
        bad = np.concatenate([r.scores[score][r.labels == 1] for r in results[model].values()])
        bins = np.histogram_bin_edges(np.concatenate([good, bad]), bins=30)
        ax.hist(good, bins=bins, alpha=0.6, label=f"good (n={good.size})", color="tab:green")
        ax.hist(bad, bins=bins, alpha=0.6, label=f"anomalous (n={bad.size})", color="tab:red")
        ax.set_title(f"{model}: '{score}' score")
        ax.set_xlabel("image score (pooled over categories)")
        ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[0, len(models)])
    cats = list(next(iter(results.values())))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        vals = [evaluation_metrics[model]["categories"][c]["image_auroc"] for c in cats]
        ax.bar(np.arange(len(cats)) + i * width, [np.nan if v is None else v for v in vals], width, label=model)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(cats)) + width * (len(models) - 1) / 2, cats, rotation=30)
    ax.set_ylim(0, 1.05)
    ax.set_title("image AUROC per category")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(grid[1, :])
    ax.axis("off")
    keys = ["image_auroc", "image_auroc_pooled", "pr_auc", "f1_max", "pixel_auroc", "aupro",
            "mean_score_good", "mean_score_anomalous"]
    cells = [[_fmt(evaluation_metrics[m].get(k)) for k in keys] for m in models]
    table = ax.table(cellText=cells, rowLabels=models, colLabels=keys, loc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.6)
    fig.suptitle(title)
    fig.tight_layout()
    io.save_figure(path, fig, dpi=90)
    plt.close(fig)


def note_figure(path: Path, text: str) -> None:
    """A figure that only states why there are no results (in place of a comparison figure)."""
    fig = plt.figure(figsize=(8, 2))
    fig.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    io.save_figure(path, fig, dpi=90)
    plt.close(fig)


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


class HeatmapPanels:
    """Writes heatmap panels, one PNG each: input, reconstruction, anomaly map, map over input, ground-truth mask.

    One figure is drawn once and updated for every panel: a fresh figure per panel took 0.20 s, the update
    0.06 s (development CPU, 64 px), which matters with 32 panels in each of four evaluation stages."""

    def __init__(self) -> None:
        self._fig, axes = plt.subplots(1, 5, figsize=(14, 3.2))
        rgb, gray = np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2), np.float32)
        self._axes = axes
        self._input = axes[0].imshow(rgb)
        self._recon = axes[1].imshow(rgb)
        self._map = axes[2].imshow(gray, cmap="jet")
        self._bar = self._fig.colorbar(self._map, ax=axes[2], fraction=0.046)
        self._under = axes[3].imshow(rgb)
        self._over = axes[3].imshow(gray, cmap="jet", alpha=0.45)
        self._mask = axes[4].imshow(gray, cmap="gray", vmin=0, vmax=1)
        self._no_mask = axes[4].text(0.5, 0.5, "no mask", ha="center", va="center", transform=axes[4].transAxes)
        for ax, name in zip(axes, ("input", "reconstruction", "anomaly map", "overlay", "ground truth")):
            ax.set_title(name)
            ax.set_xticks([])
            ax.set_yticks([])
        self._title = self._fig.suptitle("", fontsize=10)
        self._fig.tight_layout()

    def write(self, path: Path, image: np.ndarray, recon: np.ndarray, amap: np.ndarray, mask: np.ndarray | None,
              title: str, vmax: float, vmin: float = 0.0) -> None:
        """One panel; the map's colour scale spans ``vmin`` to ``vmax``."""
        h, w = amap.shape
        extent = (-0.5, w - 0.5, h - 0.5, -0.5)
        layers = [(self._input, image), (self._recon, recon), (self._map, amap), (self._under, image),
                  (self._over, amap)]
        if mask is not None:
            layers.append((self._mask, mask))
        for im, data in layers:
            im.set_data(data)
            im.set_extent(extent)
        for ax in self._axes:
            ax.set_xlim(extent[0], extent[1])
            ax.set_ylim(extent[2], extent[3])
        self._map.set_clim(vmin, vmax)
        self._over.set_clim(vmin, vmax)
        self._bar.update_normal(self._map)
        self._mask.set_visible(mask is not None)
        self._no_mask.set_visible(mask is None)
        self._title.set_text(title)
        io.save_figure(path, self._fig, dpi=72)

    def close(self) -> None:
        plt.close(self._fig)
