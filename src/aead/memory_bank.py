"""Building the PatchCore-style memory bank of a trained autoencoder (both training stages, after the head).

The bank holds patch features of the defect-free training images (:func:`aead.torch_model.patch_features`),
thinned by greedy coreset selection (k-center: each new patch is the one farthest from those already chosen), so
that it covers the training patches with a share ``memory_bank.coreset_ratio`` of them. The distances are
measured on a seeded random projection to :data:`PROJECTION_DIM` dimensions, as PatchCore does, which makes the
selection several times faster at nearly the same coverage.

The fusion statistics are measured on the validation images, never on test images: for the distance map and for
the head's probability map, the mean over validation pixels and the *peak scale*, how far above that mean a
defect-free image's highest pixel lies (the mean over validation images of the per-image maximum, minus the pixel
mean). Dividing by the peak scale puts the two maps' peaks on one scale, where the image score (the maximum of the
map) is read. A standard deviation over all pixels would not: the head's map is near 0 almost everywhere, so its
small standard deviation let its rare peaks outweigh the distance map.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from aead.data import to_float, to_tensor
from aead.params import MemoryBankParams, ModelParams
from aead.torch_model import PatchMemory, patch_features

PROJECTION_DIM = 32
SCALE_FLOOR = 1e-6  # a constant map (peak scale 0) must not divide by zero
Log = Callable[[str], None]


@dataclass
class MemoryResult:
    """The built memory and how it was built."""

    memory: PatchMemory
    patches: int
    seconds: float


def greedy_coreset(features: Tensor, size: int, seed: int) -> Tensor:
    """Indices of ``size`` rows of ``features`` (N, C) chosen by greedy k-center selection on a random
    projection, starting from a seeded random row. Deterministic given ``seed``."""
    n = features.shape[0]
    if not 1 <= size <= n:
        raise ValueError(f"coreset size must be between 1 and {n}, got {size}")
    if size == n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    x = features.float()
    if x.shape[1] > PROJECTION_DIM:
        x = x @ torch.randn(x.shape[1], PROJECTION_DIM, generator=gen)
    sq = (x * x).sum(1)
    chosen = torch.empty(size, dtype=torch.long)
    chosen[0] = torch.randint(n, (1,), generator=gen)
    nearest = torch.full((n,), float("inf"))
    for i in range(1, size):
        c = x[chosen[i - 1]]
        nearest = torch.minimum(nearest, sq - 2.0 * (x @ c) + c @ c)
        chosen[i] = torch.argmax(nearest)
    return chosen


def mean_and_peak_scale(maps: Tensor) -> tuple[Tensor, Tensor]:
    """Of (N, P) per-image maps of defect-free images: the mean over all pixels, and the peak scale, the mean over
    images of the per-image maximum minus that mean (at least :data:`SCALE_FLOOR`), in float64."""
    m = maps.double()
    mean = m.mean()
    return mean, (m.max(dim=1).values.mean() - mean).clamp_min(SCALE_FLOOR)


def _batches(images: np.ndarray, batch_size: int, device: torch.device) -> Iterator[Tensor]:
    """Float NCHW batches of uint8 NHWC ``images``, one at a time (the images may be memory-mapped)."""
    for s in range(0, len(images), batch_size):
        yield to_float(to_tensor(images[s : s + batch_size], device))


@torch.inference_mode()
def build_memory(autoencoder: nn.Module, head: nn.Module | None, train_images: np.ndarray, val_images: np.ndarray,
                 bank: MemoryBankParams, params: ModelParams, device: torch.device,
                 autocast: AbstractContextManager[Any] | None = None, batch_size: int = 32, log: Log = print,
                 tag: str = "") -> MemoryResult:
    """The memory bank of ``autoencoder``'s encoder over ``train_images`` (uint8 NHWC), and its fusion statistics
    on ``val_images`` (with the segmentation ``head``'s map; without a head the seg statistics stay 0 and 1).

    ``autocast``: the context the autoencoder and head run in, as in evaluation (the distances are fp32)."""
    autocast = nullcontext() if autocast is None else autocast
    start = time.perf_counter()
    autoencoder = autoencoder.to(device).eval()
    encoder = autoencoder.encoder
    feats = torch.cat([patch_features(encoder, x, bank.feature_size, bank.border_padding)
                       .permute(0, 2, 3, 1).flatten(0, 2).cpu() for x in _batches(train_images, batch_size, device)])
    size = max(1, round(bank.coreset_ratio * feats.shape[0]))
    chosen = greedy_coreset(feats, size, seed=params.seed + 5)
    memory = PatchMemory(size, feats.shape[1], bank.feature_size, bank.border_padding)
    memory.bank.copy_(feats[chosen])
    memory = memory.to(device)
    if len(val_images) == 0:
        raise ValueError(f"{tag}: the memory bank's fusion statistics need validation images")
    if head is not None:
        head = head.to(device).eval()
    distances, probabilities = [], []
    for x in _batches(val_images, batch_size, device):
        distances.append(memory.distance_map(encoder, x).flatten(1).cpu())
        if head is not None:
            with autocast:
                recon = autoencoder(x).float()
                probabilities.append(torch.sigmoid(head(x, recon).float()).flatten(1).cpu())
    stats = list(mean_and_peak_scale(torch.cat(distances)))
    if probabilities:
        stats += list(mean_and_peak_scale(torch.cat(probabilities)))
    else:
        stats += [torch.tensor(0.0), torch.tensor(1.0)]
    memory.fusion.copy_(torch.stack(stats).float())
    seconds = time.perf_counter() - start
    log(f"[{tag}] memory bank: {size} of {feats.shape[0]} training patches ({bank.feature_size}x"
        f"{bank.feature_size} per image, {feats.shape[1]} channels), {seconds:.1f} s")
    return MemoryResult(memory=memory.cpu(), patches=int(feats.shape[0]), seconds=seconds)
