"""The training loops: the autoencoder (L1 reconstruction, Adam, ReduceLROnPlateau, early stopping, gradient
clipping, mixed precision, and data-parallel training under ``torchrun`` with DistributedDataParallel), the
DRAEM-style segmentation head on top of a frozen trained autoencoder (focal loss on synthetic defects), and
SimpleNet's feature discriminator on a frozen backbone's patch features (noise in feature space).

Images arrive as the cached uint8 arrays of prepare-split, memory-mapped: each batch is gathered from the
file, so memory does not grow with the data set (on a GPU the whole array is uploaded once when it fits).
No image is decoded during training.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from aead import io
from aead.data.corruption import corrupt_batch
from aead.models.maps import rgb_to_gray, ssim_map
from aead.training import numerics
from aead.training.numerics import memory_format
from aead.training.checkpoint import JOINT, checkpoint_name, find_checkpoint, load_checkpoint, save_checkpoint, save_head
from aead.data.mvtec import manifest_digest, read_split, to_float, to_tensor
from aead.training.distributed import SINGLE, DistContext, all_reduce_sum, barrier, process_device, shard
from aead.errors import DataError, ParamsError, TrainingError
from aead.params import ModelParams, Params, SegmentationParams
from aead.models.torch_model import FeatureDiscriminator, build_head, build_model, count_parameters

Log = Callable[[str], None]


def select_device(choice: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ParamsError("model.device: 'cuda' was asked for but no CUDA GPU is available (use 'auto' or 'cpu')")
    return torch.device(choice)


def configure_threads(num_threads: int) -> None:
    """Set torch's CPU thread count (0 keeps torch's default: one per core)."""
    if num_threads > 0:
        torch.set_num_threads(num_threads)


def setup_compute(model: ModelParams, training: bool = False) -> torch.device:
    """The device ``model.device`` asks for, with the thread count set up and, for ``training`` with
    ``model.deterministic``, the pinned CPU numerics of :mod:`aead.training.numerics`; call it before any computation.

    Only training is pinned: it amplifies last-bit differences over thousands of steps, while a forward pass (banks,
    evaluation, export) keeps them at the last bits, far below what moves a metric (the default run under another
    oneDNN instruction set gave the same metrics: docs/measurements.md), and runs faster with the CPU's own kernels
    (training, for comparison: 1.1-1.8x, ``benchmarks/determinism.py``)."""
    configure_threads(model.num_threads)
    device = select_device(model.device)
    numerics.configure(model.deterministic and training, device)
    return device


# Upload the whole training array to the GPU when it takes at most this share of the free GPU memory.
GPU_RESIDENT_SHARE = 0.25


class ImageSource:
    """Batches of float images from a (N, H, W, 3) uint8 array, usually a memory map of prepare-split's cache.

    On CUDA the whole array is uploaded once if it fits in ``GPU_RESIDENT_SHARE`` of the free memory;
    otherwise (and always on CPU) each batch is gathered from the array, so only the pages in use are read.
    """

    def __init__(self, images: np.ndarray, device: torch.device, resident: bool | None = None):
        """``resident``: force (True) or forbid (False) uploading the whole array; None decides as above."""
        self.images = images
        self.device = device
        self.resident: Tensor | None = None
        if resident is None:
            resident = device.type == "cuda" and images.nbytes <= GPU_RESIDENT_SHARE * torch.cuda.mem_get_info(device)[0]
        if resident:
            self.resident = to_tensor(images, device)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batch(self, rows: Tensor | np.ndarray | slice) -> Tensor:
        """Float channels-last batch of the given rows, on the device."""
        if self.resident is not None:
            index = rows if isinstance(rows, slice) else torch.as_tensor(rows, device=self.device)
            return to_float(self.resident[index])
        index = rows if isinstance(rows, slice) else torch.as_tensor(rows).cpu().numpy()
        return to_float(to_tensor(self.images[index], self.device))


@dataclass
class TrainResult:
    """What one training run produced: the best weights and the per-epoch history."""

    state_dict: dict[str, Tensor]
    best_val_loss: float
    best_epoch: int
    epochs_run: int
    seconds: float
    images_per_second: float
    history: list[dict[str, float]] = field(default_factory=list)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 convolutions natively (AVX512-BF16 or AMX) through oneDNN."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_for(device: torch.device, precision: str = "auto", deterministic: bool = False
                 ) -> tuple[Any, torch.amp.GradScaler | None]:
    """The mixed-precision context (and loss scaler, for fp16) for ``model.precision``.

    ``fp32``: none. ``bf16``: bf16 autocast. ``auto``: bf16 on CUDA GPUs, fp16 with a GradScaler on older GPUs; on
    CPUs fp32 when ``deterministic`` (bf16 kernels differ between CPUs), else bf16 where the CPU computes it natively.
    Weights, optimiser and loss stay fp32. On a CPU with ``deterministic`` in a process whose numerics are pinned
    (training), the context is fp32 in :func:`aead.training.numerics.training_kernels`' convolutions."""
    if precision == "fp32" and not (deterministic and device.type == "cpu"):
        return nullcontext(), None
    if device.type == "cuda":
        if precision == "bf16" or torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16), None
        return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")
    if deterministic:
        if precision == "bf16":
            raise ParamsError("model.precision: bf16 on a CPU gives other results on other CPUs, which "
                              "model.deterministic: true rules out; use auto or fp32, or set model.deterministic: false")
        return numerics.training_kernels() or nullcontext(), None
    if precision == "bf16" or cpu_has_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16), None
    return nullcontext(), None


def flip_rotate(x: Tensor, codes: Tensor) -> Tensor:
    """Each square image of the NCHW batch ``x`` mirrored left-right if bit 2 of its code (0-7) is set, then
    turned by (code mod 4) quarter turns: the 8 symmetries of a square, code 0 leaving the image as it is."""
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"flip_rotate: expected square images, got {tuple(x.shape[-2:])}")
    if codes.shape != (x.shape[0],):
        raise ValueError(f"flip_rotate: expected one code per image ({x.shape[0]}), got shape {tuple(codes.shape)}")
    out = x.clone()
    for code in codes.unique().tolist():
        rows = (codes == code).nonzero()[:, 0].to(x.device)
        part = x[rows]
        if code & 4:
            part = torch.flip(part, dims=(-1,))
        out[rows] = torch.rot90(part, code & 3, dims=(-2, -1))
    return out


def train_autoencoder(
    model: nn.Module,
    train_images: np.ndarray,
    val_images: np.ndarray,
    params: ModelParams,
    device: torch.device,
    log: Log = print,
    tag: str = "",
    resume: Path | None = None,
    fingerprint: str = "",
    dist_ctx: DistContext = SINGLE,
    augment: bool = False,
) -> TrainResult:
    """Train ``model`` to reconstruct ``train_images``; stop early on the validation loss.

    ``augment``: every training image is randomly flipped and turned (:func:`flip_rotate`) each time it is
    drawn; the validation images never are.

    ``train_images`` and ``val_images`` are (N, H, W, 3) uint8 arrays (memory maps are read batch by batch).
    Returns the weights of the epoch with the lowest validation loss. A NaN or infinite loss stops with
    :class:`TrainingError`.

    With ``resume``, the complete training state (weights, optimiser, scheduler, early stopping, random
    generators) is saved there atomically after every epoch; a later call with the same ``fingerprint``
    continues after the last completed epoch and ends exactly as an uninterrupted run would.

    Under torchrun (``dist_ctx``), ``model.batch_size`` is the global batch: every process draws the same
    permutation, corrupts the same global batch and trains on its own contiguous part of it, with the loss
    weighted so that the averaged gradient is the gradient of the global batch mean. Validation is split
    across processes and summed. BatchNorm is synchronised on CUDA (SyncBatchNorm); on CPU (gloo) each
    process normalises with its own part's statistics. Only the main process logs and writes resume state.
    """
    world = dist_ctx.world_size
    if params.batch_size < 2 * world and len(train_images) > 1:
        raise ParamsError(f"model.batch_size: {params.batch_size} is the global batch; with {world} processes "
                          f"each needs at least 2 images (BatchNorm), so use at least {2 * world}")
    gen = torch.Generator().manual_seed(params.seed)
    model = model.to(device).to(memory_format=memory_format())
    net: nn.Module = model
    if dist_ctx.enabled:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    train_x = ImageSource(train_images, device)
    val_x = ImageSource(val_images, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=params.lr_factor, patience=params.lr_patience
    )
    autocast, scaler = autocast_for(device, params.precision, params.deterministic)
    corrupt_gen = torch.Generator().manual_seed(params.seed + 1)
    augment_gen = torch.Generator().manual_seed(params.seed + 8)
    n = len(train_x)
    batch_size = min(params.batch_size, n)
    if not dist_ctx.is_main:
        log = _quiet

    state: dict[str, Any] = {
        "fingerprint": fingerprint, "epoch": 0, "best": math.inf, "best_epoch": 0, "bad_epochs": 0,
        "history": [], "seen": 0, "seconds": 0.0, "done": False,
        "best_state": copy.deepcopy(model.state_dict()),
    }
    saved = _load_resume(resume, fingerprint, log, tag)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        gen.set_state(saved["gen"])
        corrupt_gen.set_state(saved["corrupt_gen"])
        augment_gen.set_state(saved["augment_gen"])
        state = {k: saved[k] for k in state}
    start = time.perf_counter() - state["seconds"]
    epoch = state["epoch"]
    # drop a last partial batch that leaves a process a single image: BatchNorm cannot train on one sample
    stops = [s for s in range(0, n, batch_size) if min(s + batch_size, n) - s >= 2 * world or n == 1]
    trained = sum(min(s + batch_size, n) - s for s in stops)
    while not state["done"] and epoch < params.epochs:
        epoch += 1
        net.train()
        order = torch.randperm(n, generator=gen)
        total = torch.zeros((), device=device)
        for s in stops:
            e = min(s + batch_size, n)
            lo, hi = shard(0, e - s, dist_ctx)
            if params.corruption == "none":  # this process needs only its own rows
                rows, part, mine = order[s + lo : s + hi], slice(None), slice(lo, hi)
            else:  # every process corrupts the whole batch, so the corruption draws stay in step
                rows, part, mine = order[s:e], slice(lo, hi), slice(None)
            weight = (hi - lo) * world / (e - s)
            x = train_x.batch(rows)
            if augment:  # every process draws the codes of the whole batch, so the draws stay in step
                x = flip_rotate(x, torch.randint(0, 8, (e - s,), generator=augment_gen)[mine])
            loss = train_step(net, optimizer, x, params, corrupt_gen, autocast, scaler, part=part, loss_weight=weight)
            total += loss * (hi - lo)
            state["seen"] += e - s
        train_loss = float(all_reduce_sum(total, dist_ctx)) / max(trained, 1)
        _sync_buffers(model, dist_ctx)
        val_loss = validation_loss(model, val_x, params, device, dist_ctx, autocast)
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            if resume is not None and dist_ctx.is_main:
                resume.unlink(missing_ok=True)
            raise TrainingError(
                f"{tag}: loss became {'NaN' if math.isnan(train_loss) or math.isnan(val_loss) else 'infinite'} "
                f"at epoch {epoch} (train {train_loss}, val {val_loss}); lower model.lr (now {params.lr:g}) "
                "or set model.grad_clip; no model or metrics were written"
            )
        lr = optimizer.param_groups[0]["lr"]
        state["history"].append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "lr": lr})
        scheduler.step(val_loss)
        improved = val_loss < state["best"]
        if improved:
            state.update(best=val_loss, best_epoch=epoch, bad_epochs=0, best_state=copy.deepcopy(model.state_dict()))
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        state["seconds"] = time.perf_counter() - start
        log(
            f"[{tag}] epoch {epoch}/{params.epochs}  train {train_loss:.5f}  val {val_loss:.5f}"
            f"{' *' if improved else '  '}  lr {lr:.2g}  {state['seen'] / state['seconds']:.1f} img/s"
        )
        if state["bad_epochs"] >= params.patience:
            log(f"[{tag}] early stop: no improvement for {params.patience} epochs (best epoch {state['best_epoch']})")
            state["done"] = True
        if epoch == params.epochs:
            state["done"] = True
        if resume is not None and dist_ctx.is_main:
            io.save_torch(resume, {
                **state, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "gen": gen.get_state(), "corrupt_gen": corrupt_gen.get_state(),
                "augment_gen": augment_gen.get_state(),
            })
    seconds = state["seconds"]
    return TrainResult(
        state_dict={k: v.detach().cpu() for k, v in state["best_state"].items()},
        best_val_loss=state["best"],
        best_epoch=state["best_epoch"],
        epochs_run=state["epoch"],
        seconds=seconds,
        images_per_second=state["seen"] / seconds if seconds > 0 else 0.0,
        history=state["history"],
    )


@dataclass
class HeadResult:
    """The trained segmentation head and how its training went."""

    state_dict: dict[str, Tensor]
    parameters: int
    steps: int
    final_loss: float
    seconds: float
    images_per_second: float
    history: list[dict[str, float]] = field(default_factory=list)


FOCAL_GAMMA = 2.0  # as in DRAEM: most pixels are easy background; the loss concentrates on the hard ones


def focal_loss(logits: Tensor, target: Tensor, gamma: float = FOCAL_GAMMA) -> Tensor:
    """Mean binary focal loss (Lin et al. 2017) of per-pixel logits against a {0, 1} mask."""
    ce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_true = torch.exp(-ce)  # the probability given to the true class
    return ((1.0 - p_true) ** gamma * ce).mean()


def train_segmentation_head(autoencoder: nn.Module, train_images: np.ndarray, seg: SegmentationParams,
                            params: ModelParams, device: torch.device, log: Log = print, tag: str = "",
                            augment: bool = False) -> HeadResult:
    """Train a :class:`~aead.models.torch_model.SegmentationHead` for ``seg.steps`` Adam steps (learning rate
    ``seg.lr`` decayed to 0 along a cosine) on top of the frozen
    ``autoencoder``: each batch of training images is corrupted (``seg.corruption``, a share
    ``seg.corruption_probability`` of the images), reconstructed, and the head learns the corruption mask from
    image + reconstruction with the focal loss. ``augment``: the clean images are first randomly flipped and
    turned (:func:`flip_rotate`). Deterministic given ``params.seed``."""
    autoencoder = autoencoder.to(device).to(memory_format=memory_format()).eval()
    for p in autoencoder.parameters():
        p.requires_grad_(False)
    head = build_head(seg.base_channels, seed=params.seed + 3).to(device).to(memory_format=memory_format())
    optimizer = torch.optim.Adam(head.parameters(), lr=seg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=seg.steps)
    autocast, scaler = autocast_for(device, params.precision, params.deterministic)
    gen = torch.Generator().manual_seed(params.seed + 4)
    augment_gen = torch.Generator().manual_seed(params.seed + 9)
    source = ImageSource(train_images, device)
    n = len(source)
    batch_size = min(seg.batch_size, n)
    starts = [s for s in range(0, n, batch_size) if min(s + batch_size, n) - s >= 2]  # BatchNorm needs 2
    if not starts:
        raise DataError(f"{tag}: the segmentation head needs at least 2 training images, got {n}")
    head.train()
    step, seen, recent, mean = 0, 0, torch.zeros((), device=device), math.nan
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    while step < seg.steps:
        order = torch.randperm(n, generator=gen)
        for s in starts:
            if step == seg.steps:
                break
            clean = source.batch(order[s : s + batch_size])
            if augment:
                clean = flip_rotate(clean, torch.randint(0, 8, (len(clean),), generator=augment_gen))
            x, mask = corrupt_batch(clean, seg.corruption, gen, seg.corruption_probability)
            x = x.contiguous(memory_format=memory_format())
            with autocast:
                with torch.no_grad():
                    recon = autoencoder(x)
                logits = head(x, recon).float()
            loss = focal_loss(logits, mask)
            optimizer_step(loss, head, optimizer, scaler, params.grad_clip)
            schedule.step()
            step += 1
            seen += len(x)
            recent += loss.detach()
            if step % 50 == 0 or step == seg.steps:
                mean = float(recent) / (step % 50 or 50)
                if not math.isfinite(mean):
                    raise TrainingError(f"{tag}: segmentation head loss became {mean} at step {step}; lower "
                                        f"segmentation.lr (now {seg.lr:g}); no model or metrics were written")
                recent.zero_()
                history.append({"step": step, "focal_loss": mean, "lr": schedule.get_last_lr()[0]})
                log(f"[{tag}] segmentation head step {step}/{seg.steps}  focal loss {mean:.5f}")
    seconds = time.perf_counter() - start
    return HeadResult(
        state_dict={k: v.detach().cpu() for k, v in head.state_dict().items()},
        parameters=count_parameters(head),
        steps=step,
        final_loss=mean,
        seconds=seconds,
        images_per_second=seen / seconds if seconds > 0 else 0.0,
        history=history,
    )


def _quiet(message: str) -> None:
    """The log of processes other than the main one."""


def _sync_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Give every process the main process's BatchNorm running statistics (before validation)."""
    if ctx.enabled:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


def _load_resume(path: Path | None, fingerprint: str, log: Log, tag: str) -> dict[str, Any] | None:
    """The saved training state at ``path`` if it belongs to the same params and data, else None."""
    if path is None or not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file is not fatal: training starts over
        log(f"[{tag}] ignoring unreadable resume state {path} ({err}); starting over")
        return None
    if saved.get("fingerprint") != fingerprint:
        log(f"[{tag}] resume state {path} is from other params or data; starting over")
        return None
    log(f"[{tag}] resuming after epoch {saved['epoch']} from {path}")
    return saved


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, params: ModelParams,
               corrupt_gen: torch.Generator, autocast: Any, scaler: torch.amp.GradScaler | None,
               part: slice = slice(None), loss_weight: float = 1.0) -> Tensor:
    """One optimisation step on the clean float batch ``x``: corrupt it (per ``model.corruption``),
    reconstruct, L1 (+ SSIM) loss against the clean batch, clip, step. Returns the loss on the device
    (no host synchronisation).

    ``part``: the rows of ``x`` this process trains on after the whole batch was corrupted (data-parallel
    training); ``loss_weight`` scales the loss that is back-propagated, not the one returned."""
    inp = x
    if params.corruption != "none":
        inp, _ = corrupt_batch(x, params.corruption, corrupt_gen, params.corruption_probability)
        inp = inp.contiguous(memory_format=memory_format())
    x, inp = x[part], inp[part]
    with autocast:
        recon = model(inp).float()
    loss = reconstruction_loss(recon, x, params.ssim_weight)
    optimizer_step(loss * loss_weight if loss_weight != 1.0 else loss, model, optimizer, scaler, params.grad_clip)
    return loss.detach()


def optimizer_step(loss: Tensor, model: nn.Module, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler | None, grad_clip: float) -> None:
    """Back-propagate ``loss`` (scaled for fp16), clip ``model``'s gradient norm to ``grad_clip`` (0: off) and
    step the optimiser."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def reconstruction_loss(recon: Tensor, target: Tensor, ssim_weight: float) -> Tensor:
    """Mean L1 error, plus ``ssim_weight`` x mean (1 - SSIM) on grayscale when the weight is positive."""
    loss = (recon - target).abs().mean()
    if ssim_weight > 0:
        loss = loss + ssim_weight * (1.0 - ssim_map(rgb_to_gray(recon), rgb_to_gray(target))).mean()
    return loss


# Validation images are corrupted in chunks of this many, each chunk with its own fixed seed: the same
# inputs every epoch, for any batch size or number of processes, without keeping a corrupted copy in memory.
VAL_CHUNK = 64


@torch.inference_mode()
def validation_loss(model: nn.Module, val: ImageSource, params: ModelParams, device: torch.device,
                    dist_ctx: DistContext = SINGLE, autocast: Any = None) -> float:
    """Mean training objective (eval mode) of reconstructing the validation images from their corrupted
    copies (the clean images when training without corruption). Chunks are shared out across processes.
    ``autocast``: the training loop's context (:func:`autocast_for`), so that every epoch reuses its kernels' threads
    and buffers; None makes one."""
    model.eval()
    if autocast is None:
        autocast, _ = autocast_for(device, params.precision, params.deterministic)
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    n = len(val)
    for k, c in enumerate(range(0, n, VAL_CHUNK)):
        if k % dist_ctx.world_size != dist_ctx.rank:
            continue
        clean = val.batch(slice(c, min(c + VAL_CHUNK, n)))
        inputs = clean
        if params.corruption != "none":
            gen = torch.Generator().manual_seed(params.seed + 2 + 1_000_003 * k)
            inputs, _ = corrupt_batch(clean, params.corruption, gen, params.corruption_probability)
            inputs = inputs.contiguous(memory_format=memory_format())
        for s in range(0, clean.shape[0], params.batch_size):
            x, y = inputs[s : s + params.batch_size], clean[s : s + params.batch_size]
            with autocast:
                recon = model(x).float()
            totals[0] += reconstruction_loss(recon, y, params.ssim_weight).double() * x.shape[0]
            totals[1] += x.shape[0]
    totals = all_reduce_sum(totals, dist_ctx)
    return float(totals[0] / totals[1])


def train_and_save(
    params: Params,
    model_name: str,
    models_dir: Path,
    log: Log = print,
    resume_dir: Path | None = None,
    dist_ctx: DistContext = SINGLE,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train ``model_name`` per category (or one joint model) on the prepared split and write the
    checkpoints into ``models_dir`` (replaced whole, atomically).

    With ``resume_dir``, each model's training state is kept there after every epoch, so a killed run
    resumes where it stopped when params and data are unchanged; remove it with :func:`clear_resume`
    once the stage's outputs are written. Returns the metrics (per category: best validation loss, epochs,
    parameters, seconds, images/s) and the loss-curve rows for the plots CSV.

    Under torchrun every process trains (``dist_ctx``), only the main one writes ``models_dir`` and logs.
    """
    device = process_device(setup_compute(params.model, training=True), dist_ctx)
    if not dist_ctx.is_main:
        log = _quiet
    prepared = Path(params.data.prepared_dir)
    train_split = read_split(prepared, "train")
    val_split = read_split(prepared, "val")
    _check_prepared(train_split.images, params.data.image_size, prepared / "train.npy")
    groups: list[tuple[str | None, list[str]]] = (
        [(c, [c]) for c in params.data.categories] if params.model.per_category else [(None, list(params.data.categories))]
    )
    arch = params.arch(model_name)
    digests = {s: manifest_digest(prepared, s) for s in ("train", "val")}
    processes = f", {dist_ctx.world_size} processes" if dist_ctx.enabled else ""
    log(f"training {model_name} on {device}{processes} "
        f"({'per category' if params.model.per_category else 'one joint model'})")
    metrics: dict[str, Any] = {"device": str(device), "world_size": dist_ctx.world_size,
                               "per_category": params.model.per_category, "categories": {}}
    rows: list[dict[str, Any]] = []
    with io.atomic_dir(models_dir) if dist_ctx.is_main else nullcontext(None) as tmp_dir:
        for name, cats in groups:
            train = train_split.select(cats)
            val = val_split.select(cats)
            for cat in cats:
                if not any(s.category == cat for s in train.samples):
                    raise DataError(f"{prepared / 'train.csv'}: no training images of category '{cat}'; rerun prepare-split")
            label = name or JOINT
            model = build_model(model_name, arch.base_channels, seed=params.model.seed)
            recipe = {
                "model": model_name,
                "base_channels": arch.base_channels,
                "image_size": params.data.image_size,
                "categories": cats,
                "params": {"model": dataclasses.asdict(params.model), model_name: dataclasses.asdict(arch),
                           "data": dataclasses.asdict(params.data)},
                "manifest_sha256": digests,
            }
            fingerprint = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
            augment = all(c in params.model.flip_rotate for c in cats)
            if augment:
                log(f"[{model_name}/{label}] training images randomly flipped and turned (model.flip_rotate)")
            result = train_autoencoder(model, train.images, val.images, params.model, device,
                                       log, tag=f"{model_name}/{label}",
                                       resume=resume_dir / f"{label}.pt" if resume_dir else None,
                                       fingerprint=fingerprint, dist_ctx=dist_ctx, augment=augment)
            meta = {
                **recipe,
                "best_val_loss": result.best_val_loss,
                "best_epoch": result.best_epoch,
                "epochs_run": result.epochs_run,
            }
            barrier(dist_ctx)
            if tmp_dir is not None:
                save_checkpoint(tmp_dir / checkpoint_name(name), result.state_dict, meta)
            summary = {
                "best_val_loss": result.best_val_loss,
                "best_epoch": result.best_epoch,
                "epochs_run": result.epochs_run,
                "parameters": count_parameters(model),
                "train_images": len(train.samples),
                "val_images": len(val.samples),
                "train_seconds": round(result.seconds, 2),
                "images_per_second": round(result.images_per_second, 2),
            }
            metrics["categories"][label] = summary
            rows += [{"model": model_name, "category": label, **h} for h in result.history]
    per = metrics["categories"].values()
    metrics["best_val_loss"] = float(np.mean([m["best_val_loss"] for m in per]))
    metrics["train_seconds"] = round(sum(m["train_seconds"] for m in per), 2)
    return metrics, rows


def train_heads_and_save(params: Params, model_name: str, models_root: Path, out_dir: Path,
                         log: Log = print) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train one segmentation head on each of ``model_name``'s trained autoencoders (``models_root/<model>/``) and
    write them into ``out_dir`` (replaced whole, atomically), one file per autoencoder checkpoint. Returns the
    metrics (per category: final focal loss, steps, parameters, seconds) and the loss rows for the plots CSV."""
    seg = params.segmentation
    if seg.steps == 0:
        with io.atomic_dir(out_dir):
            pass
        log(f"segmentation.steps is 0: no segmentation head for {model_name}")
        return {"note": "segmentation.steps is 0: no segmentation head is trained"}, []
    device = setup_compute(params.model, training=True)
    prepared = Path(params.data.prepared_dir)
    train_split = read_split(prepared, "train")
    metrics: dict[str, Any] = {"device": str(device), "categories": {}}
    rows: list[dict[str, Any]] = []
    done: set[Path] = set()
    with io.atomic_dir(out_dir) as tmp_dir:
        for category in params.data.categories:
            path = find_checkpoint(models_root / model_name, category)
            if path in done:  # a joint autoencoder serves every category: one head for it
                continue
            done.add(path)
            checkpoint = load_checkpoint(path, device, expect_model=model_name,
                                         expect_image_size=params.data.image_size)
            cats = checkpoint.categories
            label = path.stem
            augment = all(c in params.model.flip_rotate for c in cats)
            result = train_segmentation_head(checkpoint.model, train_split.select(cats).images, seg, params.model,
                                             device, log, tag=f"{model_name}/{label}", augment=augment)
            head = build_head(seg.base_channels)
            head.load_state_dict(result.state_dict)
            save_head(tmp_dir / path.name, head, {**dataclasses.asdict(seg), "model": model_name, "categories": cats,
                                                  "autoencoder_sha256": _file_digest(path)})
            metrics["categories"][label] = {"final_loss": result.final_loss, "steps": result.steps,
                                            "parameters": result.parameters, "train_seconds": round(result.seconds, 2),
                                            "images_per_second": round(result.images_per_second, 2)}
            rows += [{"model": model_name, "category": label, **h} for h in result.history]
    metrics["final_loss"] = float(np.mean([m["final_loss"] for m in metrics["categories"].values()]))
    return metrics, rows


def _file_digest(path: Path) -> str:
    """SHA-256 of a file: ties a head or bank to the autoencoder it was built on."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def clear_resume(resume_dir: Path) -> None:
    """Remove the resume states once a training stage has written all its outputs."""
    shutil.rmtree(resume_dir, ignore_errors=True)


def _check_prepared(images: np.ndarray, size: int, path: Path) -> None:
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise DataError(
            f"{path}: cached images are {tuple(images.shape[1:])}, expected ({size}, {size}, 3) from "
            "data.image_size; rerun prepare-split (dvc repro)"
        )


@dataclass(frozen=True)
class DiscriminatorStats:
    """What training the feature discriminator did: steps, its loss over the last tenth of them, seconds."""

    steps: int
    final_loss: float
    seconds: float


def train_feature_discriminator(patches: Tensor, hidden: int, steps: int, batch_size: int, noise: float, lr: float,
                                seed: int, log: Log = print, tag: str = "", defects: Tensor | None = None
                                ) -> tuple[FeatureDiscriminator, DiscriminatorStats]:
    """SimpleNet's training on frozen patch features ``patches`` (M, C) of defect-free images: each step draws
    ``batch_size`` patches (seeded), adapts them, and adds Gaussian noise of std ``noise`` (in units of each
    channel's standard deviation over ``patches``) to make as many fake defective ones; the discriminator learns to
    score the real ones above +0.5 and the noisy ones below -0.5 (truncated L1), with Adam (``lr``; half of it for
    the adaptor). ``defects`` (D, C), features of patches with a synthetic defect: each step also draws up to
    ``batch_size`` of them, to be scored below -0.5 like the noisy ones. It runs on one thread, so its weights do not
    depend on the thread count (pieces of the batch on parallel threads, their gradients added in order, were no
    faster at these sizes). They do depend on the last bits
    of ``patches``, which the backbone computes with each CPU's own kernels, as the bank does: a relative change of
    1e-7 in every feature moved the transistor images' discriminator scores by at most 0.5 % of their range and their
    image AUROC by 0.002 (docs/measurements.md)."""
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    losses: list[float] = []
    # callers may hold the features from inference mode; the model is built and trained outside it
    try:
        with torch.inference_mode(False), torch.enable_grad():
            gen = torch.Generator().manual_seed(seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = FeatureDiscriminator(patches.shape[1], hidden)
            with torch.no_grad():
                model.mean.copy_(patches.double().mean(0).float())
                model.scale.copy_(patches.double().std(0).float().clamp_min(1e-6))
            opt = torch.optim.Adam([{"params": model.adaptor.parameters(), "lr": lr / 2},
                                    {"params": [*model.hidden.parameters(), *model.out.parameters()], "lr": lr}],
                                   weight_decay=1e-5)
            for step in range(steps):
                adapted = model.adapt(patches[torch.randint(0, patches.shape[0], (batch_size,), generator=gen)])
                fake = adapted + torch.randn(adapted.shape, generator=gen) * noise
                fakes = [fake]
                if defects is not None and defects.shape[0]:
                    drawn = torch.randint(0, defects.shape[0], (min(batch_size, defects.shape[0]),), generator=gen)
                    fakes.append(model.adapt(defects[drawn]))
                logits = model.logits(torch.cat([adapted, *fakes]))
                loss = nn.functional.relu(0.5 - logits[:batch_size]).mean()
                for part in logits[batch_size:].split([f.shape[0] for f in fakes]):  # each kind of fake weighs as much
                    loss = loss + nn.functional.relu(0.5 + part).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if step >= steps - max(1, steps // 10):
                    losses.append(float(loss.detach()))
    finally:
        torch.set_num_threads(threads)
    stats = DiscriminatorStats(steps, float(np.mean(losses)) if losses else float("nan"), time.perf_counter() - start)
    log(f"[{tag}] feature discriminator: {steps} steps of {batch_size} patches, final loss {stats.final_loss:.4f}, "
        f"{stats.seconds:.1f} s")
    return model.eval(), stats
