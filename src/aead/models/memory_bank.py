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

The pretrained bank is built as a stream (:func:`stream_bank`): the training images are read ``pretrained.chunk_images``
at a time, and each chunk's patches are merged into the running bank by a k-center coreset of both (merge and reduce),
so memory stays bounded by the bank, one chunk and the discriminator's sample, whatever the number of images. Under
``torchrun`` each process streams its own share of the images and the main process keeps a k-center coreset of the
union of their banks (coresets compose: it covers every patch within the largest share's radius plus its own). With one
process and one chunk the bank is exactly the one-pass coreset of all the patches.

The pretrained bank's stage also trains SimpleNet's feature discriminator on a seeded uniform sample of the training
patches (all of them when they fit in ``pretrained.discriminator_patches``; ``pretrained.discriminator_*``,
:func:`aead.training.loops.train_feature_discriminator`) and measures the scale of both maps on the validation images
(:func:`part_scales`), so that the ``pretrained`` map can sum them. With ``pretrained.discriminator_defects`` it also
learns from the features of training images given a synthetic defect (:func:`synthetic_defect_patches`). With
``pretrained.brightness_sigma`` it fits a per-position model of the training images' relative brightness
(:func:`fit_brightness`, :class:`aead.models.torch_model.BrightnessModel`) and the two maps' scales
(:func:`validation_scales`), so that the map is the larger of the features' and the brightness map.
"""

from __future__ import annotations

import contextlib
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
from aead.data.corruption import corrupt_batch
from aead.data.mvtec import (Geometry, Images, Sample, Shape, category_geometry, image_sizes, load_geometry,
                             read_manifest, read_split, to_float, to_tensor)
from aead.errors import DataError
from aead.params import Params, PretrainedParams
from aead.models.maps import image_scores
from aead.models.scoring import SCALE_FLOOR, mean_and_peak_scale, shape_runs, take
from aead.models.torch_model import (BrightnessModel, FeatureDiscriminator, PatchMemory, PretrainedPatchMemory,
                                     patch_features)
from aead.training.distributed import SINGLE, DistContext, gather_rows, process_device, shard
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


def _batches(images: Images, batch_size: int, device: torch.device) -> Iterable[Tensor]:
    """Float NCHW batches of uint8 ``images``, one size per batch, one at a time (the images may be memory-mapped)."""
    shapes = [image.shape for image in images] if isinstance(images, list) else [()] * len(images)
    for start, stop in shape_runs(shapes, batch_size):
        yield to_float(to_tensor(take(images, np.arange(start, stop)), device))


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


def uniform_positions(total: int, size: int, seed: int) -> np.ndarray | None:
    """Sorted positions of a seeded uniform draw of ``size`` of ``total`` items without replacement; None (all of them)
    when ``size >= total``. Memory O(size), or O(total) int64 when ``size`` is above ``total / 50`` (numpy's choice)."""
    if size >= total:
        return None
    return np.sort(np.random.default_rng(seed).choice(total, size, replace=False))


def _rows_of(positions: np.ndarray | None, start: int, count: int) -> Tensor | slice:
    """The rows of a block of ``count`` patches numbered from ``start`` whose numbers are in ``positions`` (all when
    None)."""
    if positions is None:
        return slice(0, count)
    lo, hi = np.searchsorted(positions, [start, start + count])
    return torch.from_numpy(positions[lo:hi] - start)


class CoresetStream:
    """One process's part of a streamed bank: the running coreset of the patches it has seen and the discriminator's
    sample of them, in buffers allocated once (at the first patches). Its memory is ``(bank size + chunk_images x the
    most patches of an image + its share of the sample) x channels`` floats whatever the number of images, plus the
    greedy selection's 36 floats per buffered patch while it reduces.

    Patches are numbered over all ``total_images`` images of the category (image by image), so the random draws (the
    ``random`` coreset and the sample, seeds ``seed`` and ``seed + 1``) do not depend on how the images are shared out
    or chunked. ``patch_counts``: each image's number of patches when images differ in size (None: every image has as
    many as the first ``add`` shows). ``add`` the patches of each chunk of at most ``chunk_images`` images of
    ``first_image:stop_image``, then ``reduce``."""

    def __init__(self, method: str, ratio: float, max_size: int, seed: int, sample_size: int | None,
                 total_images: int, first_image: int, stop_image: int, chunk_images: int,
                 patch_counts: np.ndarray | None = None):
        if method not in CORESET_METHODS:
            raise ValueError(f"unknown coreset method {method!r}; use one of {', '.join(CORESET_METHODS)}")
        if patch_counts is not None and len(patch_counts) != total_images:
            raise ValueError(f"patch_counts: {len(patch_counts)} counts for {total_images} images")
        self.method, self.ratio, self.max_size, self.seed = method, ratio, max_size, seed
        self.sample_size, self.chunk_images = sample_size, chunk_images
        self.total_images, self.first_image, self.stop_image = total_images, first_image, stop_image
        self.offsets: np.ndarray | None = None
        if patch_counts is not None:
            self.offsets = np.concatenate([[0], np.cumsum(np.asarray(patch_counts, dtype=np.int64))])
        self.bank_size = self.filled = self.sampled = 0
        self.allocated = False
        self.buffer = self.sample = torch.empty(0, 0)
        self.bank_pick: np.ndarray | None = None
        self.sample_pick: np.ndarray | None = None

    @property
    def patches(self) -> int:
        """The patches of all ``total_images`` images (known from the first ``add``)."""
        return 0 if self.offsets is None else int(self.offsets[-1])

    def _allocate(self, channels: int) -> None:
        assert self.offsets is not None
        total = self.patches
        self.bank_size = coreset_size(total, self.ratio, self.max_size)
        lo, hi = int(self.offsets[self.first_image]), int(self.offsets[self.stop_image])
        if self.method == "greedy":
            counts = np.diff(self.offsets[self.first_image : self.stop_image + 1])
            capacity = self.bank_size + self.chunk_images * int(counts.max(initial=0))
        else:
            self.bank_pick = uniform_positions(total, self.bank_size, self.seed)
            capacity = hi - lo
            if self.bank_pick is not None:
                first, stop = np.searchsorted(self.bank_pick, [lo, hi])
                capacity = int(stop - first)
        drawn = uniform_positions(total, total if self.sample_size is None else self.sample_size, self.seed + 1)
        self.sample_pick = None if drawn is None else drawn[np.searchsorted(drawn, lo):np.searchsorted(drawn, hi)]
        self.buffer = torch.empty(capacity, channels)
        self.sample = torch.empty(hi - lo if self.sample_pick is None else len(self.sample_pick), channels)

    def add(self, features: Tensor, images: int, first: int) -> None:
        """The patch features (the patches of ``images`` images one after the other, C) of ``images`` images from image
        number ``first``."""
        if self.offsets is None:
            per_image = features.shape[0] // images
            self.offsets = per_image * np.arange(self.total_images + 1, dtype=np.int64)
        if not self.allocated:
            self._allocate(features.shape[1])
            self.allocated = True
        start = int(self.offsets[first])
        if int(self.offsets[first + images]) - start != features.shape[0]:
            raise ValueError(f"images {first}:{first + images} have {int(self.offsets[first + images]) - start} "
                             f"patches, got {features.shape[0]}")
        kept = features if self.method == "greedy" else features[_rows_of(self.bank_pick, start, features.shape[0])]
        if self.filled + kept.shape[0] > self.buffer.shape[0]:
            raise RuntimeError(f"more than chunk_images={self.chunk_images} images added before reduce()")
        self.buffer[self.filled : self.filled + kept.shape[0]] = kept
        self.filled += kept.shape[0]
        sampled = features[_rows_of(self.sample_pick, start, features.shape[0])]
        self.sample[self.sampled : self.sampled + sampled.shape[0]] = sampled
        self.sampled += sampled.shape[0]

    def reduce(self) -> None:
        """Merge the patches added since the last call into the running coreset: greedy, a k-center coreset of both
        to the bank size; random, nothing to do (the draw is fixed)."""
        if self.method == "greedy" and self.filled > self.bank_size:
            chosen = greedy_coreset(self.buffer[: self.filled], self.bank_size, self.seed)
            self.buffer[: self.bank_size] = self.buffer[chosen]
            self.filled = self.bank_size

    @property
    def coreset(self) -> Tensor:
        """The running coreset (rows of the buffer)."""
        return self.buffer[: self.filled]


@dataclass
class StreamedBank:
    """What a streamed build leaves on the main process: the bank's patches (in the order the last coreset chose
    them), the discriminator's sample of training patches (in their global order), and how it went."""

    bank: Tensor
    sample: Tensor
    stats: BankStats


LoadImages = Callable[[int, int], Images]


@torch.inference_mode()
def stream_bank(extract: Callable[[Tensor], Tensor], load_images: LoadImages, n_images: int, method: str,
                ratio: float, max_size: int, seed: int, sample_size: int | None, chunk_images: int, batch_size: int,
                device: torch.device, ctx: DistContext = SINGLE, patch_counts: np.ndarray | None = None
                ) -> StreamedBank | None:
    """The bank of the patches ``extract`` finds in training images ``load_images(start, stop)`` (uint8, images
    ``start:stop`` of ``n_images``; ``patch_counts``, each image's patches, when they differ in size: see
    :class:`CoresetStream`), built chunk by chunk (:class:`CoresetStream`), and a uniform sample of at most
    ``sample_size`` of the patches (None: all). A collective under ``torchrun``: each process streams its contiguous
    share of the images, and the main process gathers the shares' coresets and samples and, greedy, keeps a k-center
    coreset of their union; it returns the result, the other processes None."""
    start = time.perf_counter()
    if n_images < ctx.world_size:
        raise DataError(f"{n_images} training images for {ctx.world_size} processes: each process needs at least one; "
                        "start fewer (pretrained.launcher)")
    lo, hi = shard(0, n_images, ctx)
    stream = CoresetStream(method, ratio, max_size, seed, sample_size, n_images, lo, hi, chunk_images, patch_counts)
    for first in range(lo, hi, chunk_images):
        images = load_images(first, min(first + chunk_images, hi))
        image = first
        for x in _batches(images, batch_size, device):
            f = extract(x)
            stream.add(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).cpu(), x.shape[0], image)
            image += x.shape[0]
        del images
        stream.reduce()
    coresets = gather_rows(stream.coreset, ctx)
    sample = gather_rows(stream.sample, ctx)
    if coresets is None or sample is None:
        return None
    bank = coresets
    if coresets.shape[0] > stream.bank_size:  # several processes' coresets (greedy)
        bank = coresets[greedy_coreset(coresets, stream.bank_size, seed)]
    stats = BankStats(n_images, stream.patches, bank.shape[0], time.perf_counter() - start)
    return StreamedBank(bank, sample, stats)


def fill_pretrained_bank(memory: PretrainedPatchMemory, train_images: np.ndarray, method: str, ratio: float,
                         max_size: int, seed: int, device: torch.device, batch_size: int = 8, log: Log = print,
                         tag: str = "", fit_discriminator: FitDiscriminator | None = None,
                         chunk_images: int | None = None, sample_size: int | None = None
                         ) -> tuple[PretrainedPatchMemory, BankStats, DiscriminatorStats | None]:
    """``memory`` (a backbone with an empty bank) with its bank filled from ``train_images`` (uint8 NHWC, already
    at the working shape) in one process, ``chunk_images`` at a time (None: all at once), and with
    ``fit_discriminator`` a feature discriminator trained on a uniform sample of at most ``sample_size`` training
    patches (None: all of them; its part scales still at their defaults: see :func:`part_scales`)."""
    memory = memory.to(device).eval()
    streamed = stream_bank(memory.features, lambda a, b: train_images[a:b], len(train_images), method, ratio,
                           max_size, seed, sample_size, chunk_images or len(train_images), batch_size, device)
    assert streamed is not None  # one process: the main one
    return finish_pretrained_bank(memory, streamed, method, log, tag, fit_discriminator)


def finish_pretrained_bank(memory: PretrainedPatchMemory, streamed: StreamedBank, method: str, log: Log = print,
                           tag: str = "", fit_discriminator: FitDiscriminator | None = None
                           ) -> tuple[PretrainedPatchMemory, BankStats, DiscriminatorStats | None]:
    """``memory`` with the streamed bank, and with ``fit_discriminator`` its discriminator trained on the sample."""
    stats = streamed.stats
    log(f"[{tag}] pretrained bank: {stats.bank_size} of {stats.patches} training patches "
        f"({streamed.bank.shape[1]} channels, {method} coreset), {stats.seconds:.1f} s")
    discriminator, fitted = None, None
    if fit_discriminator is not None:
        discriminator, fitted = fit_discriminator(streamed.sample)
    filled = PretrainedPatchMemory(memory.backbone, memory.layers, memory.neighbourhood, stats.bank_size,
                                   streamed.bank.shape[1], memory.padding, discriminator)
    with torch.inference_mode():
        filled.bank.copy_(streamed.bank)
    return filled.cpu(), stats, fitted


@torch.inference_mode()
def validation_scales(memory: PretrainedPatchMemory, val_images: Images, device: torch.device, batch_size: int = 8
                      ) -> tuple[Tensor, Tensor | None]:
    """From one pass over defect-free ``val_images`` (uint8, at their working shapes), before the map is smoothed (so
    ``pretrained.smooth_sigma`` stays a parameter of the scoring alone): (2, 2) the mean and peak scale
    (:func:`aead.models.scoring.mean_and_peak_scale`) of the nearest-patch distance map and of the discriminator's
    map (rows of 0 and 1 for a part ``memory`` lacks); with a brightness model also (2, 2) the mean and standard
    deviation of the features' map's and the brightness map's ``top1`` scores (on the first scales), else None."""
    if len(val_images) == 0:
        raise ValueError("the part scales need validation images")
    memory = memory.to(device).eval()
    features = 1 + (memory.discriminator is not None)  # the features' parts come first, the brightness map last
    collected: list[list[Tensor]] = [[], [], []]
    for x in _batches(val_images, batch_size, device):
        for i, amap in enumerate(memory.part_maps(x)):
            collected[i if i < features else 2].extend(amap.cpu())
    scales = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    for i in range(features):
        scales[i] = torch.stack(mean_and_peak_scale([m.flatten() for m in collected[i]])).float()
    if memory.brightness is None:
        return scales, None
    feature_maps = [memory.feature_map([c[j] for c in collected[:features]], scales) for j in range(len(collected[0]))]
    tops = []
    for maps in (feature_maps, collected[2]):
        top = torch.stack([image_scores(m[None].float(), smooth_sigma=0.0)["top1"][0] for m in maps]).double()
        spread = top.std() if len(top) > 1 else top.new_tensor(1.0)
        tops.append(torch.stack([top.mean(), spread.clamp_min(SCALE_FLOOR)]))
    return scales, torch.stack(tops).float()


def part_scales(memory: PretrainedPatchMemory, val_images: Images, device: torch.device, batch_size: int = 8
                ) -> Tensor:
    """(2, 2): the mean and peak scale of the nearest-patch distance map and of the discriminator's map over
    defect-free ``val_images`` (:func:`validation_scales`)."""
    return validation_scales(memory, val_images, device, batch_size)[0]


@torch.inference_mode()
def fit_brightness(sigma: float, shape: Shape, load: Callable[[int, int], Images], n_images: int, chunk_images: int,
                   batch_size: int, device: torch.device) -> BrightnessModel:
    """A :class:`BrightnessModel` of ``sigma`` pixels on the cells of a working ``shape``, fitted on ``n_images``
    training images read ``chunk_images`` at a time by ``load(start, stop)`` (uint8, at their working shapes)."""
    model = BrightnessModel(sigma, BrightnessModel.grid_of(shape, sigma)).to(device)
    cells = [model.cells(x).cpu() for start in range(0, n_images, chunk_images)
             for x in _batches(load(start, min(n_images, start + chunk_images)), batch_size, device)]
    model.fit(torch.cat(cells))
    return model.cpu()


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


@torch.inference_mode()
def synthetic_defect_patches(memory: PretrainedPatchMemory, images: Images, mode: str, seed: int, batch_size: int,
                             device: torch.device, cover: float = 0.5) -> Tensor:
    """(M, C): the patch features of ``images`` (uint8, at their working shapes) with a synthetic defect each
    (:func:`aead.data.corruption.corrupt_batch`, ``mode``), at the grid positions at least ``cover`` of whose cell
    the defect covers."""
    gen = torch.Generator().manual_seed(seed)
    out: list[Tensor] = []
    for x in _batches(images, batch_size, device):
        corrupted, mask = corrupt_batch(x, mode, gen, probability=1.0)
        f = memory.features(corrupted)
        covered = nn.functional.interpolate(mask, size=f.shape[-2:], mode="area")[:, 0] >= cover
        out.append(f.permute(0, 2, 3, 1)[covered].cpu())
    return torch.cat(out)


def pretrained_memory(pretrained: PretrainedParams, bank_size: int = 0, channels: int = 0) -> PretrainedPatchMemory:
    """A pretrained memory for these params: the backbone with its packaged weights and an empty bank."""
    return PretrainedPatchMemory(build_backbone(pretrained.backbone), pretrained.layers, pretrained.neighbourhood,
                                 bank_size, channels, pretrained.border_padding)


def pretrained_geometry(memory: PretrainedPatchMemory, pre: PretrainedParams, train_sizes: np.ndarray) -> Geometry:
    """How a category's images are resized for the pretrained map (``pretrained.geometry``, :class:`Geometry`), from
    its training images' ``train_sizes`` (:func:`aead.data.mvtec.image_sizes`): short side ``pretrained.image_size``
    (each image's, or the median training image's at one pixel scale), both sides a multiple of the deepest chosen
    layer's stride."""
    multiple = max(memory.backbone.stride(name) for name in memory.layers)
    return category_geometry(train_sizes, pre.image_size, pre.geometry, multiple)


def patch_count(memory: PretrainedPatchMemory, shape: Shape) -> int:
    """The patches :meth:`PretrainedPatchMemory.features` gives an image of working ``shape``: its finest layer's grid."""
    stride = memory.backbone.stride(memory.layers[0])
    return ((shape[0] + stride - 1) // stride) * ((shape[1] + stride - 1) // stride)


def build_pretrained_banks_and_save(params: Params, out_dir: Path, log: Log = print,
                                    ctx: DistContext = SINGLE) -> dict[str, Any]:
    """The pretrained memory bank of every category (``pretrained.*``) over its training images, streamed from the
    prepared manifests at the category's working shape ``pretrained.chunk_images`` at a time (:func:`stream_bank`),
    with its feature discriminator and the part scales measured on the category's validation images
    (``pretrained.discriminator_steps`` > 0) and its brightness model (``pretrained.brightness_sigma`` > 0), written
    into ``out_dir`` (replaced whole, atomically). Under ``torchrun``
    (``ctx``) every process streams its share of each category; the main process alone logs, finishes the banks and
    writes them, and returns the metrics (the others an empty dict)."""
    device = process_device(setup_compute(params.model), ctx)
    pre = params.pretrained
    prepared = Path(params.data.prepared_dir)
    train_split = read_manifest(prepared, "train")
    needs_val = bool(pre.discriminator_steps or pre.brightness_sigma)
    val_split = read_manifest(prepared, "val") if needs_val else []
    empty = pretrained_memory(pre).eval()
    if not ctx.is_main:
        log = _quiet
    metrics: dict[str, Any] = {"device": str(device), "backbone": pre.backbone, "processes": ctx.world_size,
                               "categories": {}}
    with io.atomic_dir(out_dir) if ctx.is_main else contextlib.nullcontext(out_dir) as tmp_dir:
        for category in params.data.categories:
            samples = [s for s in train_split if s.category == category]
            if not samples:
                raise DataError(f"{prepared}/train.csv: no training images of category '{category}'; rerun "
                                "prepare-split (dvc repro)")
            val_samples = [s for s in val_split if s.category == category]
            if needs_val and not val_samples:
                raise DataError(f"{prepared}/val.csv: no validation images of category '{category}', which the "
                                "pretrained map needs to put its parts (bank, discriminator, brightness) on one "
                                "scale; add good images, raise data.val_fraction, or set "
                                "pretrained.discriminator_steps: 0 and pretrained.brightness_sigma: 0")
            native = image_sizes(samples, f"{prepared}/train.csv")  # each header read once
            geometry = pretrained_geometry(empty, pre, native)
            shapes = [geometry.of(int(h), int(w)) for h, w in native]
            order = sorted(range(len(samples)), key=lambda i: shapes[i])  # stable: one-size categories keep their order
            samples, shapes = [samples[i] for i in order], [shapes[i] for i in order]
            tag = f"pretrained/{category}"
            sizes = len(set(shapes))
            log(f"[{tag}] {len(samples)} training images at " + (f"{shapes[0][0]}x{shapes[0][1]}" if sizes == 1 else
                f"{sizes} working shapes (one pixel scale, {geometry.num}/{geometry.den})") +
                f", read {pre.chunk_images} at a time by each of {ctx.world_size} process(es)")

            def load(start: int, stop: int, chosen: list[Sample] = samples, geo: Geometry = geometry) -> Images:
                return load_geometry(chosen[start:stop], geo, with_masks=False)[0]

            streamed = stream_bank(empty.to(device).features, load, len(samples), pre.coreset_method, pre.coreset_ratio,
                                   pre.max_bank_size, pre.seed, pre.discriminator_patches, pre.chunk_images,
                                   pre.batch_size, device, ctx, np.array([patch_count(empty, s) for s in shapes]))
            if streamed is None:  # not the main process: it finishes the category
                continue
            fit = None
            if pre.discriminator_steps:
                def fit(feats: Tensor, chosen: list[Sample] = samples, geo: Geometry = geometry
                        ) -> tuple[FeatureDiscriminator, DiscriminatorStats]:
                    defects = None
                    if pre.discriminator_defects:
                        t0 = time.perf_counter()
                        pick = np.sort(np.random.default_rng(pre.seed).choice(
                            len(chosen), min(pre.discriminator_defects, len(chosen)), replace=False))
                        images = load_geometry([chosen[i] for i in pick], geo, with_masks=False)[0]
                        defects = synthetic_defect_patches(empty.to(device), images, pre.discriminator_corruption,
                                                           pre.seed, pre.batch_size, device)
                        log(f"[{tag}] {defects.shape[0]} defect patches of {len(pick)} training images with a "
                            f"synthetic defect ({pre.discriminator_corruption}), {time.perf_counter() - t0:.1f} s")
                    log(f"[{tag}] feature discriminator on {feats.shape[0]} of the training patches")
                    return train_feature_discriminator(feats, pre.discriminator_hidden, pre.discriminator_steps,
                                                       pre.discriminator_batch_size, pre.discriminator_noise,
                                                       pre.discriminator_lr, pre.seed, log=log, tag=tag,
                                                       defects=defects)
            memory, stats, fitted = finish_pretrained_bank(empty, streamed, pre.coreset_method, log=log, tag=tag,
                                                           fit_discriminator=fit)
            del streamed
            memory.index_bank(pre.search_dim, pre.search_candidates)
            record: dict[str, Any] = {"shape": list(geometry.shape), "working_shapes": sizes, **stats.to_dict()}
            if fitted is not None:
                record.update({"discriminator_seconds": round(fitted.seconds, 2),
                               "discriminator_final_loss": round(fitted.final_loss, 6)})
            if pre.brightness_sigma:
                start = time.perf_counter()
                memory.brightness = fit_brightness(pre.brightness_sigma, geometry.shape, load, len(samples),
                                                   pre.chunk_images, pre.batch_size, device)
                record["brightness_seconds"] = round(time.perf_counter() - start, 2)
                log(f"[{tag}] brightness model on {len(samples)} training images, {record['brightness_seconds']} s")
            if needs_val:
                start = time.perf_counter()
                val_images = load_geometry(val_samples, geometry, with_masks=False)[0]
                scales_t, fusion_t = validation_scales(memory, val_images, device, pre.batch_size)
                with torch.inference_mode():
                    memory.part_scales.copy_(scales_t)
                    if fusion_t is not None:
                        memory.fusion_scales.copy_(fusion_t)
                scales, fusion = memory.part_scales.tolist(), memory.fusion_scales.tolist()
                log(f"[{tag}] scales on {len(val_samples)} validation images: bank mean {scales[0][0]:.4g} "
                    f"scale {scales[0][1]:.4g}" + (f", discriminator mean {scales[1][0]:.4g} scale {scales[1][1]:.4g}"
                                                    if fitted is not None else "") +
                    (f"; top-1 % scores: features {fusion[0][0]:.4g} +- {fusion[0][1]:.4g}, brightness "
                     f"{fusion[1][0]:.4g} +- {fusion[1][1]:.4g}" if fusion_t is not None else ""))
                record["part_scales_seconds"] = round(time.perf_counter() - start, 2)
                if fitted is not None:
                    record["part_scales"] = [[round(v, 6) for v in row] for row in scales]
                if fusion_t is not None:
                    record["fusion_scales"] = [[round(v, 6) for v in row] for row in fusion]
            save_pretrained_bank(tmp_dir / f"{category}.pt", memory.cpu(),
                                 {**dataclasses.asdict(pre), "shape": list(geometry.shape),
                                  "geometry": geometry.to_dict(), "categories": [category]})
            metrics["categories"][category] = record
    if not ctx.is_main:
        return {}
    metrics["bank_size"] = int(sum(m["bank_size"] for m in metrics["categories"].values()))
    return metrics


def _quiet(message: str) -> None:
    """The log of the processes other than the main one."""
