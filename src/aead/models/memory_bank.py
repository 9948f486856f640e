"""Memory banks of defect-free patch features (PatchCore, Roth et al., CVPR 2022): on this project's own encoder
(stages ``build-bank@<model>``) and on a frozen ImageNet backbone (stage ``build-pretrained-bank``).

Every training patch's features are collected, then a coreset of them is kept: ``coreset_ratio`` of the patches, at
most ``max_bank_size``. The ``greedy`` coreset is k-center selection (each new patch is the one farthest from those
already chosen), measured on a seeded random projection to :data:`PROJECTION_DIM` dimensions as PatchCore does; it
costs O(N x k) for N patches and k chosen, so the bound on k keeps it linear in N. ``random`` draws the patches
uniformly (O(N)). The size bound also keeps the nearest-neighbour search of the scoring linear in the number of
test images. The pretrained bank is then indexed for a two-stage search (``pretrained.search_candidates`` candidates
ranked in its ``pretrained.search_dim`` principal dimensions, :func:`aead.models.torch_model.candidate_distance`), or
searched exactly (:func:`aead.models.torch_model.nearest_distance`).

The pretrained bank's stage also trains SimpleNet's feature discriminator on all the training patches
(``pretrained.discriminator_*``, :func:`aead.training.loops.train_feature_discriminator`) and measures the scale of both
maps on the validation images (:func:`part_scales`), so that the ``pretrained`` map can sum them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from aead import io
from aead.models.backbones import build_backbone
from aead.training.checkpoint import find_checkpoint, load_checkpoint, save_encoder_bank, save_pretrained_bank
from aead.data.mvtec import Sample, Shape, category_shape, load_split, read_manifest, read_split, to_float, to_tensor
from aead.errors import DataError
from aead.params import Params, PretrainedParams
from aead.models.scoring import mean_and_peak_scale
from aead.models.torch_model import FeatureDiscriminator, PatchMemory, PretrainedPatchMemory, patch_features
from aead.training.loops import DiscriminatorStats, setup_compute, train_feature_discriminator

PROJECTION_DIM = 32
CORESET_METHODS = ("greedy", "random")
Log = Callable[[str], None]
FitDiscriminator = Callable[[Tensor], tuple[FeatureDiscriminator, DiscriminatorStats]]


@dataclass
class BankStats:
    """How a bank was built: training patches seen, patches kept, seconds, and images per second."""

    images: int
    patches: int
    bank_size: int
    seconds: float

    def to_dict(self) -> dict[str, float | int]:
        return {"images": self.images, "patches": self.patches, "bank_size": self.bank_size,
                "build_seconds": round(self.seconds, 2),
                "build_images_per_second": round(self.images / self.seconds, 2) if self.seconds > 0 else 0.0}


def coreset_size(patches: int, ratio: float, max_size: int) -> int:
    """How many of ``patches`` a bank keeps: ``ratio`` of them, at least 1 and at most ``max_size``."""
    return max(1, min(round(ratio * patches), max_size, patches))


def greedy_coreset(features: Tensor, size: int, seed: int) -> Tensor:
    """Indices of ``size`` rows of ``features`` (N, C) chosen by greedy k-center selection on a random
    projection, starting from a seeded random row. Deterministic given ``seed``; O(N x size)."""
    n = features.shape[0]
    if not 1 <= size <= n:
        raise ValueError(f"coreset size must be between 1 and {n}, got {size}")
    if size == n:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    x = features.float()
    if x.shape[1] > PROJECTION_DIM:
        x = x @ torch.randn(x.shape[1], PROJECTION_DIM, generator=gen)
    x = x.contiguous()
    sq = (x * x).sum(1)
    chosen = torch.empty(size, dtype=torch.long)
    chosen[0] = torch.randint(n, (1,), generator=gen)
    nearest = torch.full((n,), float("inf"))
    step = torch.empty(n)
    for i in range(1, size):
        c = x[chosen[i - 1]]
        torch.addmv(sq, x, c, alpha=-2.0, out=step)  # |x - c|^2 - |c|^2: the same ranking, one pass
        torch.minimum(nearest, step + c @ c, out=nearest)
        chosen[i] = torch.argmax(nearest)
    return chosen


def select_coreset(features: Tensor, method: str, ratio: float, max_size: int, seed: int) -> Tensor:
    """Indices of the rows of ``features`` a bank keeps (see the module docstring), in increasing order for
    ``random`` and in order of selection for ``greedy``."""
    size = coreset_size(features.shape[0], ratio, max_size)
    if method == "greedy":
        return greedy_coreset(features, size, seed)
    if method == "random":
        gen = torch.Generator().manual_seed(seed)
        return torch.randperm(features.shape[0], generator=gen)[:size].sort().values
    raise ValueError(f"unknown coreset method {method!r}; use one of {', '.join(CORESET_METHODS)}")


def _batches(images: np.ndarray, batch_size: int, device: torch.device) -> Iterable[Tensor]:
    """Float NCHW batches of uint8 NHWC ``images``, one at a time (the images may be memory-mapped)."""
    for s in range(0, len(images), batch_size):
        yield to_float(to_tensor(images[s : s + batch_size], device))


def _collect(extract: Callable[[Tensor], Tensor], batches: Iterable[Tensor]) -> tuple[Tensor, int]:
    """Every patch's features (N, C) on the CPU, and the number of images they came from."""
    parts, images = [], 0
    for x in batches:
        f = extract(x)
        parts.append(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).cpu())
        images += x.shape[0]
    return torch.cat(parts), images


@torch.inference_mode()
def build_encoder_bank(encoder: nn.Module, train_images: np.ndarray, feature_size: int, border_padding: int,
                       method: str, ratio: float, max_size: int, seed: int, device: torch.device,
                       batch_size: int = 32, log: Log = print, tag: str = "") -> tuple[PatchMemory, BankStats]:
    """The memory bank of a trained ``encoder``'s patch features over ``train_images`` (uint8 NHWC)."""
    start = time.perf_counter()
    encoder = encoder.to(device).eval()
    feats, n_images = _collect(lambda x: patch_features(encoder, x, feature_size, border_padding),
                               _batches(train_images, batch_size, device))
    chosen = select_coreset(feats, method, ratio, max_size, seed)
    memory = PatchMemory(len(chosen), feats.shape[1], feature_size, border_padding)
    memory.bank.copy_(feats[chosen])
    stats = BankStats(n_images, int(feats.shape[0]), len(chosen), time.perf_counter() - start)
    log(f"[{tag}] memory bank: {stats.bank_size} of {stats.patches} training patches ({feature_size}x{feature_size} "
        f"per image, {feats.shape[1]} channels, {method} coreset), {stats.seconds:.1f} s")
    return memory, stats


@torch.inference_mode()
def fill_pretrained_bank(memory: PretrainedPatchMemory, train_images: np.ndarray, method: str, ratio: float,
                         max_size: int, seed: int, device: torch.device, batch_size: int = 8, log: Log = print,
                         tag: str = "", fit_discriminator: FitDiscriminator | None = None
                         ) -> tuple[PretrainedPatchMemory, BankStats, DiscriminatorStats | None]:
    """``memory`` (a backbone with an empty bank) with its bank filled from ``train_images`` (uint8 NHWC, already
    at the working shape), and with ``fit_discriminator`` a feature discriminator trained on all the training
    patches (its part scales still at their defaults: see :func:`part_scales`)."""
    start = time.perf_counter()
    memory = memory.to(device).eval()
    feats, n_images = _collect(memory.features, _batches(train_images, batch_size, device))
    chosen = select_coreset(feats, method, ratio, max_size, seed)
    stats = BankStats(n_images, int(feats.shape[0]), len(chosen), time.perf_counter() - start)
    log(f"[{tag}] pretrained bank: {stats.bank_size} of {stats.patches} training patches ({feats.shape[1]} channels, "
        f"{method} coreset), {stats.seconds:.1f} s")
    discriminator, fitted = None, None
    if fit_discriminator is not None:
        discriminator, fitted = fit_discriminator(feats)
    filled = PretrainedPatchMemory(memory.backbone, memory.layers, memory.neighbourhood, len(chosen), feats.shape[1],
                                   memory.padding, discriminator)
    filled.bank.copy_(feats[chosen])
    return filled.cpu(), stats, fitted


@torch.inference_mode()
def part_scales(memory: PretrainedPatchMemory, val_images: np.ndarray, device: torch.device, batch_size: int = 8
                ) -> Tensor:
    """(2, 2): the mean and peak scale (:func:`aead.models.scoring.mean_and_peak_scale`) of the nearest-patch distance map
    and of the discriminator's map over defect-free ``val_images`` (uint8 NHWC at the working shape), before the map
    is smoothed (so ``pretrained.smooth_sigma`` stays a parameter of the scoring alone)."""
    if len(val_images) == 0:
        raise ValueError("the part scales need validation images")
    memory = memory.to(device).eval()
    collected: list[list[Tensor]] = [[], []]
    for x in _batches(val_images, batch_size, device):
        for i, amap in enumerate(memory.part_maps(x)):
            collected[i].append(amap.flatten(1).cpu())
    return torch.stack([torch.stack(mean_and_peak_scale(torch.cat(c))) for c in collected]).float()


def build_banks_and_save(params: Params, model_name: str, models_root: Path, out_dir: Path,
                         log: Log = print) -> dict[str, Any]:
    """The memory bank of each of ``model_name``'s trained autoencoders (``models_root/<model>/``), written into
    ``out_dir`` (replaced whole, atomically), one file per autoencoder checkpoint. Returns the metrics."""
    bank = params.memory_bank
    if bank.coreset_ratio == 0:
        with io.atomic_dir(out_dir):
            pass
        log(f"memory_bank.coreset_ratio is 0: no memory bank for {model_name}")
        return {"note": "memory_bank.coreset_ratio is 0: no memory bank is built"}
    device = setup_compute(params.model)
    train_split = read_split(Path(params.data.prepared_dir), "train")
    metrics: dict[str, Any] = {"device": str(device), "categories": {}}
    done: set[Path] = set()
    with io.atomic_dir(out_dir) as tmp_dir:
        for category in params.data.categories:
            path = find_checkpoint(models_root / model_name, category)
            if path in done:
                continue
            done.add(path)
            checkpoint = load_checkpoint(path, device, expect_model=model_name,
                                         expect_image_size=params.data.image_size)
            memory, stats = build_encoder_bank(
                checkpoint.model.encoder, train_split.select(checkpoint.categories).images, bank.feature_size,
                bank.border_padding, bank.coreset_method, bank.coreset_ratio, bank.max_bank_size,
                params.model.seed + 5, device, log=log, tag=f"{model_name}/{path.stem}")
            save_encoder_bank(tmp_dir / path.name, memory,
                              {**dataclasses.asdict(bank), "model": model_name, "categories": checkpoint.categories,
                               "autoencoder_sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
            metrics["categories"][path.stem] = stats.to_dict()
    metrics["bank_size"] = int(sum(m["bank_size"] for m in metrics["categories"].values()))
    return metrics


def pretrained_memory(pretrained: PretrainedParams, bank_size: int = 0, channels: int = 0) -> PretrainedPatchMemory:
    """A pretrained memory for these params: the backbone with its packaged weights and an empty bank."""
    return PretrainedPatchMemory(build_backbone(pretrained.backbone), pretrained.layers, pretrained.neighbourhood,
                                 bank_size, channels, pretrained.border_padding)


def pretrained_shape(memory: PretrainedPatchMemory, image_size: int, train_samples: list[Sample]) -> Shape:
    """The working shape of a category for the pretrained map: aspect ratio kept, short side ``image_size``, both
    sides a multiple of the deepest chosen layer's stride."""
    multiple = max(memory.backbone.stride(name) for name in memory.layers)
    return category_shape(train_samples, image_size, multiple)


def build_pretrained_banks_and_save(params: Params, out_dir: Path, log: Log = print) -> dict[str, Any]:
    """The pretrained memory bank of every category (``pretrained.*``) over its training images, decoded from the
    prepared manifests at the category's working shape, with its feature discriminator and the part scales measured on
    the category's validation images (``pretrained.discriminator_steps`` > 0), written into ``out_dir`` (replaced
    whole, atomically)."""
    device = setup_compute(params.model)
    pre = params.pretrained
    prepared = Path(params.data.prepared_dir)
    train_split = read_manifest(prepared, "train")
    val_split = read_manifest(prepared, "val") if pre.discriminator_steps else []
    empty = pretrained_memory(pre)
    metrics: dict[str, Any] = {"device": str(device), "backbone": pre.backbone, "categories": {}}
    with io.atomic_dir(out_dir) as tmp_dir:
        for category in params.data.categories:
            samples = [s for s in train_split if s.category == category]
            if not samples:
                raise DataError(f"{prepared}/train.csv: no training images of category '{category}'; rerun "
                                "prepare-split (dvc repro)")
            val_samples = [s for s in val_split if s.category == category]
            if pre.discriminator_steps and not val_samples:
                raise DataError(f"{prepared}/val.csv: no validation images of category '{category}', which the "
                                "pretrained map needs to put its discriminator and its bank on one scale; add good "
                                "images, raise data.val_fraction, or set pretrained.discriminator_steps: 0")
            shape = pretrained_shape(empty, pre.image_size, samples)
            tag = f"pretrained/{category}"
            log(f"[{tag}] decoding {len(samples)} training images at {shape[0]}x{shape[1]}")
            images = load_split(samples, shape, with_masks=False).images
            fit = None
            if pre.discriminator_steps:
                def fit(feats: Tensor) -> tuple[FeatureDiscriminator, DiscriminatorStats]:
                    return train_feature_discriminator(feats, pre.discriminator_hidden, pre.discriminator_steps,
                                                       pre.discriminator_batch_size, pre.discriminator_noise,
                                                       pre.discriminator_lr, pre.seed, log=log, tag=tag)
            memory, stats, fitted = fill_pretrained_bank(empty, images, pre.coreset_method, pre.coreset_ratio,
                                                         pre.max_bank_size, pre.seed, device, pre.batch_size, log=log,
                                                         tag=tag, fit_discriminator=fit)
            memory.index_bank(pre.search_dim, pre.search_candidates)
            record: dict[str, Any] = {"shape": list(shape), **stats.to_dict()}
            if fitted is not None:
                start = time.perf_counter()
                val_images = load_split(val_samples, shape, with_masks=False).images
                scales_t = part_scales(memory, val_images, device, pre.batch_size)
                with torch.inference_mode():
                    memory.part_scales.copy_(scales_t)
                scales = memory.part_scales.tolist()
                log(f"[{tag}] part scales on {len(val_samples)} validation images: bank mean {scales[0][0]:.4g} "
                    f"scale {scales[0][1]:.4g}, discriminator mean {scales[1][0]:.4g} scale {scales[1][1]:.4g}")
                record.update({"discriminator_seconds": round(fitted.seconds, 2),
                               "discriminator_final_loss": round(fitted.final_loss, 6),
                               "part_scales_seconds": round(time.perf_counter() - start, 2),
                               "part_scales": [[round(v, 6) for v in row] for row in scales]})
            save_pretrained_bank(tmp_dir / f"{category}.pt", memory,
                                 {**dataclasses.asdict(pre), "shape": list(shape), "categories": [category]})
            metrics["categories"][category] = record
    metrics["bank_size"] = int(sum(m["bank_size"] for m in metrics["categories"].values()))
    return metrics
