"""Anomaly maps and image scores: every method's map as one torch module (:class:`AnomalyMapper`), used alike by the
evaluation stages, ``aead predict`` and the exported detectors, and the helpers that run it over a split.

The single maps (``parts``):

``l1``: per-pixel L1 error of the autoencoder's reconstruction (mean over channels), Gaussian-smoothed.
``ssim``: 1 - SSIM of input and reconstruction on grayscale with a Gaussian window, then Gaussian smoothing.
``seg``: the defect probability of the segmentation head (DRAEM-style) that sees image and reconstruction, smoothed.
``knn``: each patch's distance to the nearest defect-free patch in the memory bank of the autoencoder's encoder
(PatchCore-style), upsampled and smoothed.
``pretrained``: the same on a frozen ImageNet backbone (PatchCore), at its own image shape, smoothed with
``pretrained.smooth_sigma``.

The ``fused`` map sums several of them (``evaluate.fused``) on the grid of the finest one, each minus its mean over
the validation images' pixels and divided by its *peak scale*, how far above that mean a defect-free image's
highest pixel lies (the mean over validation images of the per-image maximum, minus the pixel mean). Dividing by the
peak scale puts the maps' peaks on one scale, where the image score (the maximum of the map) is read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from aead.models import maps
from aead.data.corruption import corrupt_batch
from aead.data.mvtec import Geometry, Images, Shape, resize_batch, to_float, to_tensor
from aead.models.torch_model import PatchMemory, PretrainedPatchMemory, sum_on_scales

SCORE_NAMES: tuple[str, ...] = ("mean", "top1", "max")
RECONSTRUCTION_PARTS = ("l1", "ssim", "seg")  # the maps that need the autoencoder's reconstruction
SCALE_FLOOR = 1e-6  # a constant map (peak scale 0) must not divide by zero
CALIBRATION_CORRUPTION = "perlin"


def mean_and_peak_scale(part_maps: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Of per-image maps of defect-free images ((N, P), or N flattened maps of several sizes): the mean over all
    pixels, and the peak scale, the mean over images of the per-image maximum minus that mean (at least
    :data:`SCALE_FLOOR`), in float64."""
    if not isinstance(part_maps, Tensor) and len({m.numel() for m in part_maps}) == 1:
        part_maps = torch.stack(list(part_maps))
    if isinstance(part_maps, Tensor):
        m = part_maps.double()
        mean = m.mean()
        return mean, (m.max(dim=1).values.mean() - mean).clamp_min(SCALE_FLOOR)
    mean = torch.cat([m.double().flatten() for m in part_maps]).mean()
    peaks = torch.stack([m.double().max() for m in part_maps])
    return mean, (peaks.mean() - mean).clamp_min(SCALE_FLOOR)


class AnomalyMapper(nn.Module):
    """The anomaly map of one method for one model and category, from float images in [0, 1] already resized to
    the autoencoder's shape (``x_ae``) and to the pretrained bank's shape (``x_pre``); either may be None when no
    part needs it. The map has ``out_shape``: the pretrained bank's shape when it is a part (each image's own working
    shape at one pixel scale: ``geometry``, how the pretrained map's images are resized), else the autoencoder's.
    ``fusion`` holds each part's validation mean and peak scale (used only when there are several parts)."""

    def __init__(self, parts: tuple[str, ...], out_shape: Shape, smooth_sigma: float, window_sigma: float,
                 pretrained_sigma: float, autoencoder: nn.Module | None = None, head: nn.Module | None = None,
                 memory: PatchMemory | None = None, pretrained: PretrainedPatchMemory | None = None,
                 geometry: Geometry | None = None) -> None:
        super().__init__()
        needs = {"autoencoder": autoencoder is None and bool(set(parts) & {"l1", "ssim", "seg", "knn"}),
                 "segmentation head": head is None and "seg" in parts, "memory bank": memory is None and "knn" in parts,
                 "pretrained bank": pretrained is None and "pretrained" in parts}
        missing = [name for name, absent in needs.items() if absent]
        if missing:
            raise ValueError(f"maps {', '.join(parts)} need the {' and the '.join(missing)}")
        self.parts = tuple(parts)
        self.out_shape = (int(out_shape[0]), int(out_shape[1]))
        self.smooth_sigma = smooth_sigma
        self.window_sigma = window_sigma
        self.pretrained_sigma = pretrained_sigma
        self.autoencoder = autoencoder
        self.head = head if "seg" in parts else None
        self.memory = memory if "knn" in parts else None
        self.pretrained = pretrained if "pretrained" in parts else None
        self.geometry = geometry if self.pretrained is not None else None
        if self.pretrained is not None and geometry is None:
            raise ValueError("the pretrained map needs its bank's geometry")
        self.register_buffer("fusion", torch.tensor([[0.0, 1.0]] * len(parts), dtype=torch.float64))

    @property
    def needs_autoencoder_input(self) -> bool:
        return any(p != "pretrained" for p in self.parts)

    @property
    def needs_pretrained_input(self) -> bool:
        return "pretrained" in self.parts

    def part_maps(self, x_ae: Tensor | None, x_pre: Tensor | None) -> list[Tensor]:
        """Each part's smoothed (N, h, w) map, in fp32: at ``x_pre``'s shape when the pretrained map needs it (each
        image's own working shape at one pixel scale), else at ``out_shape``. The autoencoder and the segmentation
        head run in the caller's autocast context, if any; distances, smoothing and resizing always in fp32."""
        shape = x_pre.shape[-2:] if x_pre is not None else self.out_shape
        recon = None
        if x_ae is not None and any(p in RECONSTRUCTION_PARTS for p in self.parts):
            recon = self.autoencoder(x_ae).float()
        seg = None
        if self.head is not None:
            seg = torch.sigmoid(self.head(x_ae, recon).float())[:, 0]
        out = []
        with torch.autocast(x_ae.device.type if x_ae is not None else x_pre.device.type, enabled=False):
            for part in self.parts:
                if part == "pretrained":
                    raw, sigma = self.pretrained.distance_map(x_pre), self.pretrained_sigma
                elif part == "l1":
                    raw, sigma = maps.l1_map(x_ae.float(), recon), self.smooth_sigma
                elif part == "ssim":
                    raw = maps.ssim_error_map(x_ae.float(), recon, window_sigma=self.window_sigma, smooth_sigma=0.0)
                    sigma = self.smooth_sigma
                elif part == "seg":
                    raw, sigma = seg, self.smooth_sigma
                else:
                    raw, sigma = self.memory.distance_map(self.autoencoder.encoder, x_ae), self.smooth_sigma
                amap = maps.gaussian_blur(raw.float()[:, None], sigma)
                # the pretrained map comes at x_pre's shape, the others at the autoencoder's: resized to x_pre's by
                # their kind, not by comparing sizes, which an exported graph cannot do (its x_pre shape is symbolic)
                if part != "pretrained" and x_pre is not None:
                    amap = nn.functional.interpolate(amap, size=shape, mode="bilinear", align_corners=False)
                out.append(amap[:, 0])
        return out

    def forward(self, x_ae: Tensor | None, x_pre: Tensor | None) -> Tensor:
        part_maps = self.part_maps(x_ae, x_pre)
        if len(part_maps) == 1:
            return part_maps[0]
        return sum_on_scales(part_maps, self.fusion.float())


@dataclass
class Inputs:
    """One category's images of one split, at each shape a map needs (uint8; either may be None). ``pretrained`` is
    one (N, H, W, 3) array, or a list of images at their own working shapes (``pretrained.geometry: scale``)."""

    autoencoder: np.ndarray | None
    pretrained: Images | None

    def __len__(self) -> int:
        return len(self.autoencoder if self.autoencoder is not None else self.pretrained)

    def groups(self, batch_size: int) -> Iterator[np.ndarray]:
        """Indices of the images of each batch: runs of ``batch_size`` in order when the images are one array, else
        the images sorted by working shape (stable), at most ``batch_size`` of one shape per batch."""
        n = len(self)
        if not isinstance(self.pretrained, list):
            order = np.arange(n)
            shapes: list[tuple[int, ...]] = [()] * n
        else:
            order = np.array(sorted(range(n), key=lambda i: self.pretrained[i].shape), dtype=np.int64)
            shapes = [self.pretrained[i].shape for i in order]
        for start, stop in shape_runs(shapes, batch_size):
            yield order[start:stop]

    def batches(self, batch_size: int, device: torch.device) -> Iterator[tuple[np.ndarray, Tensor | None, Tensor | None]]:
        """(indices, autoencoder batch, pretrained batch): float channels-last batches on ``device``, each of one
        working shape (:meth:`groups`)."""
        for rows in self.groups(batch_size):
            yield (rows, *(None if a is None else to_float(to_tensor(take(a, rows), device))
                           for a in (self.autoencoder, self.pretrained)))


def shape_runs(shapes: Sequence[tuple[int, ...]], batch_size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive runs of at most ``batch_size`` equal ``shapes``: the batches of images of
    one working shape, in order."""
    start = 0
    while start < len(shapes):
        stop = start + 1
        while stop < len(shapes) and stop - start < batch_size and shapes[stop] == shapes[start]:
            stop += 1
        yield start, stop
        start = stop


def take(images: Images, rows: np.ndarray) -> np.ndarray:
    """Images ``rows`` (consecutive ones of an array as a view, a list's stacked)."""
    if isinstance(images, list):
        return np.stack([images[i] for i in rows])
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1:
        return images[rows[0] : rows[-1] + 1]
    return images[rows]


@dataclass
class Scored:
    """Maps (N, H, W) float32 at the mapper's ``out_shape`` (each image's own map resized to it), image scores by name
    (N,) float64 (each from the image's own map), and with ``own_maps`` each image's map at its own working shape."""

    maps: np.ndarray
    scores: dict[str, np.ndarray]
    own: list[np.ndarray] | None = None


@torch.inference_mode()
def score_inputs(mapper: AnomalyMapper, inputs: Inputs, batch_size: int, device: torch.device,
                 autocast: AbstractContextManager[Any] | None = None, own_maps: bool = False) -> Scored:
    """Every image's map and image scores (the map is already smoothed, so ``max`` reads it as it is)."""
    autocast = nullcontext() if autocast is None else autocast
    n = len(inputs)
    out = np.empty((n, *mapper.out_shape), dtype=np.float32)
    own: list[np.ndarray] | None = [np.empty(0, np.float32)] * n if own_maps else None
    scores = {k: np.empty(n, dtype=np.float64) for k in SCORE_NAMES}
    for rows, x_ae, x_pre in inputs.batches(batch_size, device):
        with autocast:
            amap = mapper(x_ae, x_pre).float()
        batch_scores = maps.image_scores(amap, smooth_sigma=0.0)
        for k in SCORE_NAMES:
            scores[k][rows] = batch_scores[k].double().cpu().numpy()
        if own is not None:
            for j, i in enumerate(rows.tolist()):
                own[i] = amap[j].cpu().numpy()
        if tuple(amap.shape[-2:]) != mapper.out_shape:
            amap = nn.functional.interpolate(amap[:, None], size=mapper.out_shape, mode="bilinear",
                                             align_corners=False)[:, 0]
        out[rows] = amap.cpu().numpy()
    return Scored(out, scores, own)


@torch.inference_mode()
def fusion_statistics(mapper: AnomalyMapper, val: Inputs, batch_size: int, device: torch.device,
                      autocast: AbstractContextManager[Any] | None = None) -> Tensor:
    """(parts, 2) float64: each part's mean and peak scale over the validation (defect-free) images."""
    autocast = nullcontext() if autocast is None else autocast
    if len(val) == 0:
        raise ValueError("the fused map's statistics need validation images")
    collected: list[list[Tensor]] = [[] for _ in mapper.parts]
    for _, x_ae, x_pre in val.batches(batch_size, device):
        with autocast:
            for i, amap in enumerate(mapper.part_maps(x_ae, x_pre)):
                collected[i].extend(amap.flatten(1).cpu())
    return torch.stack([torch.stack(mean_and_peak_scale(c)) for c in collected])


def with_synthetic_defects(inputs: Inputs, seed: int) -> Inputs:
    """A copy of ``inputs`` where every image carries a synthetic defect (Perlin blobs, seeded). The defect is drawn
    at the pretrained shape when there is one and resized to the autoencoder's, so both parts see the same defect."""
    gen = torch.Generator().manual_seed(seed)
    as_images = lambda t: t.permute(0, 2, 3, 1).to(torch.uint8).numpy()  # noqa: E731

    def corrupt(source: np.ndarray) -> Tensor:
        x = to_tensor(source, torch.device("cpu")).float() / 255.0
        return (corrupt_batch(x, CALIBRATION_CORRUPTION, gen, probability=1.0)[0] * 255.0).round().clamp(0, 255)

    if inputs.pretrained is None:
        return Inputs(as_images(corrupt(inputs.autoencoder)), None)
    if isinstance(inputs.pretrained, list):  # one image at a time, each at its own shape
        big_each = [corrupt(image[None]) for image in inputs.pretrained]
        small = None
        if inputs.autoencoder is not None:
            small = np.concatenate([as_images(resize_batch(b, inputs.autoencoder.shape[1:3])) for b in big_each])
        return Inputs(small, [as_images(b)[0] for b in big_each])
    big = corrupt(inputs.pretrained)
    small = None
    if inputs.autoencoder is not None:
        small = as_images(resize_batch(big, inputs.autoencoder.shape[1:3]))
    return Inputs(small, as_images(big))
