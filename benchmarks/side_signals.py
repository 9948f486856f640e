"""Signals beside the pretrained map, measured on a finished run: do a brightness map, a shading-descriptor bank or a
global feature Gaussian find the defects the map misses (smooth brightness changes: the held-out surfaces' "uneven"
regions, the synthetic tile's oil stains), and what do they cost where the map already works?

For one category of a run folder (``benchmarks/real_data.py``'s, or the repository after ``dvc repro``), every
validation and test image is scored as ``evaluate-pretrained`` scores it (the run's bank and discriminator, each image
at its own working shape), and from the same images:

``brightness``: |log of the gray level's local mean (Gaussian sigma 16 px) - the image's median of it|;
``shading``: each 8 x 8 px cell's distance to the nearest of 16,384 training cells (drawn at random), described by
four differences of Gaussians of the log gray level (8 to 128 px, channels scaled by their training spread);
``position``: the brightness signal's local mean less the image's median, compared at each relative position (a grid of
16 px cells of the category's working shape, stretched over each image) with its mean over the training images, in
units of its standard deviation there (floored at the median of those deviations): a brightness model that knows where
the part's own brightness belongs, where the parts lie in one place (objects, aligned scans);
``global``: the Mahalanobis distance (Ledoit-Wolf covariance of the training images) of the backbone's per-image
channel means and standard deviations of ``--global-layers``, summed over the layers; an image score, no map.

Each signal alone, and fused with the map: both image scores (``top1``) as z-scores over the validation images,
summed with a weight (``+w``) or the larger of the two (``max``); for the maps the same affine maps, so the fused
map's ``top1`` is the fused score. Prints image AUROC overall and per defect type, and pixel AUROC (every second
pixel of the category's mask grid) where the test images have masks.

    python benchmarks/side_signals.py --run /tmp/real/def_ks/default
    python benchmarks/side_signals.py --run . --category tile      # the synthetic set after dvc repro
    python benchmarks/side_signals.py --run /tmp/real/def_tr/default --signals position    # one signal
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

from aead.data.mvtec import read_split
from aead.evaluation.evaluate import TrainedModels, category_inputs
from aead.models.maps import gaussian_blur, image_scores
from aead.models.scoring import SCALE_FLOOR, AnomalyMapper, Inputs, score_inputs
from aead.params import load_params

CELL = 8
SHADING_BANK = 16384


def top1(m: np.ndarray) -> float:
    """A map's ``top1`` image score, as the evaluation reads it (:func:`aead.models.maps.image_scores`)."""
    return float(image_scores(torch.from_numpy(m)[None], smooth_sigma=0.0)["top1"])


def gray(inputs: Inputs) -> list[torch.Tensor]:
    """Each image's gray level (mean of its channels), (H, W) float, at its working shape."""
    images = inputs.pretrained if isinstance(inputs.pretrained, list) else list(inputs.pretrained)
    return [torch.from_numpy(np.asarray(im, dtype=np.float32).mean(-1)) for im in images]


def relative_brightness(g: torch.Tensor) -> torch.Tensor:
    """(H, W): the log of the gray level's local mean (Gaussian sigma 16 px) less its median over the image."""
    local = torch.log(gaussian_blur(g[None, None], 16.0) + 8.0)[0, 0]
    return local - local.median()


def brightness_map(g: torch.Tensor) -> np.ndarray:
    return relative_brightness(g).abs().numpy()


def position_mapper(train: list[torch.Tensor], grid: tuple[int, int]) -> Callable[[torch.Tensor], np.ndarray]:
    """The ``position`` signal: each training image's relative brightness averaged onto ``grid`` (its relative
    positions), its mean and floored standard deviation there; a new image's map is its distance from that mean in
    those units, the grid stretched bilinearly over the image."""
    rows = torch.cat([F.interpolate(relative_brightness(g)[None, None], size=grid, mode="area") for g in train])[:, 0]
    mean, std = rows.mean(0), rows.std(0) if len(train) > 1 else torch.ones(grid)
    std = torch.maximum(std, std.median())

    def amap(g: torch.Tensor) -> np.ndarray:
        field = relative_brightness(g)
        m, s = (F.interpolate(v[None, None], size=field.shape, mode="bilinear", align_corners=False)[0, 0]
                for v in (mean, std))
        return ((field - m).abs() / s).numpy()

    return amap


def shading_descriptors(g: torch.Tensor) -> torch.Tensor:
    """(4, h, w): differences of Gaussians (sigma 1, 2, 4, 8 cells) of the log gray level on the 8 px cell grid."""
    p = F.avg_pool2d(torch.log(g + 8.0)[None, None], CELL, ceil_mode=True)
    blurs = [p] + [gaussian_blur(p, 2.0 ** k) for k in range(4)]
    return torch.cat([blurs[k] - blurs[k + 1] for k in range(4)], 1)[0]


def shading_mapper(train: list[torch.Tensor], seed: int) -> Callable[[torch.Tensor], np.ndarray]:
    rows = torch.cat([shading_descriptors(g).flatten(1).T for g in train])
    spread = rows.std(0)
    rows = rows / spread
    bank = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:SHADING_BANK]]
    bank_sq = (bank * bank).sum(1)

    def amap(g: torch.Tensor) -> np.ndarray:
        f = shading_descriptors(g)
        q = f.flatten(1).T / spread
        d2 = torch.addmm(bank_sq[None], q, bank.T, alpha=-2.0).min(1).values + (q * q).sum(1)
        m = F.interpolate(d2.clamp_min(0).sqrt().reshape(1, 1, *f.shape[1:]), scale_factor=CELL, mode="bilinear",
                          align_corners=False)[..., : g.shape[0], : g.shape[1]]
        return gaussian_blur(m, 4.0)[0, 0].numpy()

    return amap


@torch.inference_mode()
def pooled(mapper: AnomalyMapper, inputs: Inputs, layers: tuple[str, ...]) -> list[np.ndarray]:
    """Per layer, (N, 2C): each image's channel means and standard deviations of the backbone's output (0 where the
    layer has one position: a tiny image)."""
    backbone = mapper.pretrained.backbone
    rows: list[list[torch.Tensor]] = [[] for _ in layers]
    order = []
    for idx, _, x in inputs.batches(8, torch.device("cpu")):
        for i, y in enumerate(backbone(x, layers)):
            spread = y.std((2, 3)) if y.shape[-2] * y.shape[-1] > 1 else torch.zeros_like(y[:, :, 0, 0])
            rows[i].append(torch.cat([y.mean((2, 3)), spread], 1))
        order.append(idx)
    where = np.argsort(np.concatenate(order))
    return [torch.cat(r).numpy()[where] for r in rows]


def resized(m: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    m = F.interpolate(torch.from_numpy(m)[None, None], size=shape, mode="bilinear", align_corners=False)
    return m[0, 0].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a run folder: params.yaml, models/, prepared split")
    parser.add_argument("--category", help="default: the first of data.categories")
    parser.add_argument("--global-layers", default="blocks.6,blocks.14,blocks.20")
    parser.add_argument("--signals", default="brightness,shading,position,global",
                        help="comma-separated: which of brightness, shading, position and global to score")
    args = parser.parse_args()
    os.chdir(args.run)
    params = load_params("params.yaml")
    cat = args.category or params.data.categories[0]
    mapper = TrainedModels(params, Path("models"), torch.device("cpu")).mapper("pretrained", "pretrained", cat)
    splits = {name: read_split(Path(params.data.prepared_dir), name).select([cat]) for name in ("train", "val", "test")}
    inputs = {name: category_inputs(mapper, split, with_masks=name == "test") for name, split in splits.items()}
    test = splits["test"]
    labels = np.array([s.label for s in test.samples])
    types = [s.defect_type for s in test.samples]
    masks = inputs["test"][1]
    scored = {name: score_inputs(mapper, inputs[name][0], 8, torch.device("cpu"), own_maps=True)
              for name in ("val", "test")}
    pre = {name: s.own for name, s in scored.items()}
    grays = {name: gray(inputs[name][0]) for name in inputs}

    has_mask = None
    if masks is not None and masks[labels == 1].any():
        has_mask = np.array([label == 0 or masks[i].any() for i, label in enumerate(labels)])
        mask_pixels = masks[has_mask][:, ::2, ::2].ravel()

    def report(name: str, scores: np.ndarray, maps: list[np.ndarray] | None = None) -> None:
        line = f"{name:22s} image {roc_auc_score(labels, scores):.3f}"
        for kind in sorted(set(types) - {"good"}):
            sel = np.array([t in (kind, "good") for t in types])
            line += f"  {kind} {roc_auc_score(labels[sel], scores[sel]):.3f}"
        if maps is not None and has_mask is not None:
            stacked = np.stack([resized(m, mapper.out_shape)[::2, ::2] for m, h in zip(maps, has_mask) if h])
            line += f"  | pixel {roc_auc_score(mask_pixels, stacked.ravel()):.3f}"
        print(line, flush=True)

    def z(val_scores: np.ndarray) -> Callable[[np.ndarray | float], np.ndarray | float]:
        mean, std = val_scores.mean(), max(float(val_scores.std()), SCALE_FLOOR)  # a constant signal: no division by 0
        return lambda v: (v - mean) / std

    pre_val, pre_test = scored["val"].scores["top1"], scored["test"].scores["top1"]
    zp = z(pre_val)
    print(f"{cat}: {len(grays['train'])} training, {len(pre_val)} validation, {len(labels)} test images")
    report("pretrained map", pre_test, pre["test"])

    signals = set(args.signals.split(","))
    if unknown := signals - {"brightness", "shading", "position", "global"}:
        parser.error(f"--signals: unknown {sorted(unknown)}")
    mappers: dict[str, Callable[[torch.Tensor], np.ndarray]] = {"brightness": brightness_map}
    if "shading" in signals:
        mappers["shading"] = shading_mapper(grays["train"], params.pretrained.seed)
    if "position" in signals:
        mappers["position"] = position_mapper(grays["train"], (max(1, mapper.out_shape[0] // 16),
                                                                max(1, mapper.out_shape[1] // 16)))
    for name, amap in ((n, a) for n, a in mappers.items() if n in signals):
        val_maps = [amap(g) for g in grays["val"]]
        test_maps = [amap(g) for g in grays["test"]]
        zs = z(np.array([top1(m) for m in val_maps]))
        report(f"{name} alone", np.array([top1(m) for m in test_maps]), test_maps)
        for label, fuse in (("+0.5", lambda a, b: a + 0.5 * b), ("+1", lambda a, b: a + b), ("max", np.maximum)):
            fused = [fuse(zp(m), zs(s)) for m, s in zip(pre["test"], test_maps)]
            report(f"map {label} {name}", np.array([top1(m) for m in fused]), fused)

    if "global" not in signals:
        return
    layers = tuple(args.global_layers.split(","))
    feats = {name: pooled(mapper, inputs[name][0], layers) for name in inputs}
    distance = {name: np.zeros(len(grays[name])) for name in ("val", "test")}
    for i in range(len(layers)):
        gaussian = LedoitWolf().fit(feats["train"][i])
        for name in distance:
            distance[name] += gaussian.mahalanobis(feats[name][i])
    zg = z(distance["val"])
    report("global alone", distance["test"])
    report("map +0.5 global", zp(pre_test) + 0.5 * zg(distance["test"]))
    report("map +1 global", zp(pre_test) + zg(distance["test"]))
    report("map max global", np.maximum(zp(pre_test), zg(distance["test"])))


if __name__ == "__main__":
    main()
