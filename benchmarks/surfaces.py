"""PatchCore variants on one MVTec-layout category, outside the pipeline: which backbone, layers, image size, bank
size and extra feature channels find defects on real surfaces (KolektorSDD) and objects (MVTec AD transistor).

Uses the project's own pieces (``PretrainedPatchMemory.features``, ``memory_bank.select_coreset``,
``torch_model.nearest_distance``, ``maps.gaussian_blur``, ``maps.image_scores``) on all of ``train/good`` (the
pipeline holds 15 % out for validation), and prints one JSON line: image AUROC (``top1`` and ``max`` scores), pixel
AUROC (every third pixel) and seconds for features, coreset and scoring. Appends it to ``--out`` too.

    python benchmarks/surfaces.py --root ../shared/data/kolektorsdd_256 --category commutator \\
        --backbone efficientnet_lite2 --layers blocks.6,blocks.14 --bank 16384
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from aead.models import maps
from aead.models.backbones import build_backbone
from aead.data.mvtec import category_shape, load_split, scan_category, to_float, to_tensor
from aead.models.memory_bank import _batches, _collect, select_coreset
from aead.models.torch_model import PretrainedPatchMemory, nearest_distance


def extra_channels(memory: PretrainedPatchMemory, x: torch.Tensor, f: torch.Tensor, expand: list[int],
                   intensity: float, fine: str = "", fine_weight: float = 1.0) -> list[torch.Tensor]:
    """Probe-only channels on ``f``'s grid: the expansion activations of EfficientNet-Lite blocks ``expand`` (6x
    the block's input channels), ``intensity`` x the local mean and standard deviation of the gray image, and
    ``fine_weight`` x a finer layer ``fine``'s output max-pooled to the grid (a thin line's strongest response in each
    cell), then averaged over the neighbourhood."""
    out: list[torch.Tensor] = []
    p, k = memory.padding, memory.neighbourhood
    if fine:
        level = memory.backbone(F.pad(x, (p, p, p, p), mode="reflect") if p else x, (fine,))[0]
        c = memory.crop
        ratio = level.shape[-2] // (f.shape[-2] + 2 * c)  # the finer layer's positions per grid cell
        level = F.avg_pool2d(F.max_pool2d(level, ratio), k, 1, k // 2)
        out.append(fine_weight * level[..., c : level.shape[-2] - c, c : level.shape[-1] - c])
    if expand:
        net = memory.backbone.net
        z = net.stem(memory.backbone.normalize(F.pad(x, (p, p, p, p), mode="reflect") if p else x))
        for i, block in enumerate(net._blocks):
            if i in expand:
                level = F.relu6(block._bn0(block._expand_conv(z)))
                level = F.avg_pool2d(level, k, 1, k // 2, count_include_pad=False)
                c = p // ((x.shape[-1] + 2 * p) // level.shape[-1])  # the mirrored border on this grid
                level = level[..., c : level.shape[-2] - c, c : level.shape[-1] - c]
                out.append(F.interpolate(level, size=f.shape[-2:], mode="bilinear", align_corners=False))
            if i >= max(expand):
                break
            z = block(z)
    if intensity:
        gray = x.mean(1, keepdim=True)
        s = x.shape[-1] // f.shape[-1]
        pool = lambda t: F.avg_pool2d(t, 2 * s, s, s // 2, count_include_pad=False)[..., : f.shape[-2], : f.shape[-1]]  # noqa: E731
        mean = pool(gray)
        std = (pool(gray * gray) - mean * mean).clamp_min(0).sqrt()
        out.append(intensity * torch.cat([mean, std], 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", required=True, help="MVTec-layout folder")
    ap.add_argument("--category", required=True)
    ap.add_argument("--backbone", default="efficientnet_lite2")
    ap.add_argument("--layers", default="blocks.6,blocks.14", help="comma-separated")
    ap.add_argument("--size", type=int, default=224, help="short side (aspect ratio kept unless --square)")
    ap.add_argument("--square", action="store_true")
    ap.add_argument("--neighbourhood", type=int, default=3)
    ap.add_argument("--padding", type=int, default=32)
    ap.add_argument("--bank", type=int, default=16384, help="greedy coreset size (at most 10 %% of the patches)")
    ap.add_argument("--sigma", type=float, default=4.0)
    ap.add_argument("--expand", default="", help="probe: comma-separated Lite blocks whose expansion is appended")
    ap.add_argument("--intensity", type=float, default=0.0, help="probe: weight of local gray mean and std")
    ap.add_argument("--fine", default="", help="probe: a finer layer max-pooled to the grid and appended")
    ap.add_argument("--fine-weight", type=float, default=1.0)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=None, help="JSON lines file to append the result to")
    a = ap.parse_args()

    train, test = scan_category(Path(a.root), a.category)
    backbone = build_backbone(a.backbone)
    layers = tuple(a.layers.split(","))
    memory = PretrainedPatchMemory(backbone, layers, a.neighbourhood, 0, 0, a.padding)
    multiple = max(backbone.stride(layer) for layer in layers)
    shape = (a.size, a.size) if a.square else category_shape(train, a.size, multiple)
    expand = [int(e) for e in a.expand.split(",") if e]
    cpu = torch.device("cpu")

    def features(x: torch.Tensor) -> torch.Tensor:
        f = memory.features(x)
        return torch.cat([f, *extra_channels(memory, x, f, expand, a.intensity, a.fine, a.fine_weight)], 1)

    train_images = load_split(train, shape, with_masks=False).images
    test_split = load_split(test, shape, with_masks=True)
    with torch.inference_mode():
        t0 = time.perf_counter()
        feats, _ = _collect(features, _batches(train_images, 8, cpu))
        t1 = time.perf_counter()
        bank = feats[select_coreset(feats, "greedy", 0.1, a.bank, 0)].contiguous()
        t2 = time.perf_counter()
        amaps = []
        for s in range(0, len(test_split.images), 8):
            x = to_float(to_tensor(test_split.images[s : s + 8], cpu))
            f = features(x)
            d = nearest_distance(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]), bank)
            d = F.interpolate(d.reshape(x.shape[0], 1, *f.shape[-2:]), size=shape, mode="bilinear",
                              align_corners=False)
            amaps.append(maps.gaussian_blur(d, a.sigma)[:, 0])
        amaps_t = torch.cat(amaps)
        t3 = time.perf_counter()
    labels = np.array([s.label for s in test])
    scores = maps.image_scores(amaps_t, smooth_sigma=0)
    result = {"tag": a.tag, "args": {k: str(v) for k, v in vars(a).items()}, "shape": list(shape),
              "patches": int(feats.shape[0]), "channels": int(feats.shape[1]), "bank": int(bank.shape[0]),
              "image_auroc_top1": round(roc_auc_score(labels, scores["top1"].numpy()), 4),
              "image_auroc_max": round(roc_auc_score(labels, scores["max"].numpy()), 4),
              "pixel_auroc": round(roc_auc_score(test_split.masks.reshape(-1)[::3] > 0,
                                                 amaps_t.numpy().reshape(-1)[::3]), 4),
              "features_s": round(t1 - t0, 1), "coreset_s": round(t2 - t1, 1), "scoring_s": round(t3 - t2, 1)}
    print(json.dumps(result))
    if a.out:
        with open(a.out, "a") as fh:
            fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
