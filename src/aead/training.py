"""The training loop: L1 reconstruction, Adam, ReduceLROnPlateau, early stopping, gradient clipping,
mixed precision (bf16). Images arrive as cached uint8 arrays and stay in memory (on the GPU when
training there), so no image is decoded during training.
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

from aead import io
from aead.corruption import corrupt_batch
from aead.maps import rgb_to_gray, ssim_map
from aead.checkpoint import JOINT, checkpoint_name, save_checkpoint
from aead.data import manifest_digest, read_split
from aead.errors import DataError, ParamsError, TrainingError
from aead.params import ModelParams, Params
from aead.torch_model import build_model, count_parameters

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


def to_tensor(images: np.ndarray, device: torch.device) -> Tensor:
    """(N, H, W, 3) uint8 array -> (N, 3, H, W) uint8 tensor on ``device`` (converted to float per batch)."""
    array = np.require(images, dtype=np.uint8, requirements=["C", "W"])  # copies a read-only memory map
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous().to(device)


def to_float(batch: Tensor) -> Tensor:
    """uint8 NCHW -> float in [0, 1], channels-last (faster convolutions on CPU and GPU)."""
    return (batch.float() / 255.0).contiguous(memory_format=torch.channels_last)


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


def autocast_for(device: torch.device, precision: str = "auto") -> tuple[Any, torch.amp.GradScaler | None]:
    """The mixed-precision context (and loss scaler, for fp16) for ``model.precision``.

    ``fp32``: none. ``bf16``: bf16 autocast. ``auto``: bf16 on CUDA GPUs and CPUs that support it natively,
    fp16 with a GradScaler on older GPUs, fp32 elsewhere. Weights, optimiser and loss stay fp32."""
    if precision == "fp32":
        return nullcontext(), None
    if device.type == "cuda":
        if precision == "bf16" or torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16), None
        return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")
    if precision == "bf16" or cpu_has_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16), None
    return nullcontext(), None


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
) -> TrainResult:
    """Train ``model`` to reconstruct ``train_images``; stop early on the validation loss.

    ``train_images`` and ``val_images`` are (N, H, W, 3) uint8. Returns the weights of the epoch with the
    lowest validation loss. A NaN or infinite loss stops with :class:`TrainingError`.

    With ``resume``, the complete training state (weights, optimiser, scheduler, early stopping, random
    generators) is saved there atomically after every epoch; a later call with the same ``fingerprint``
    continues after the last completed epoch and ends exactly as an uninterrupted run would.
    """
    gen = torch.Generator().manual_seed(params.seed)
    model = model.to(device).to(memory_format=torch.channels_last)
    train_x = to_tensor(train_images, device)
    val_x = to_tensor(val_images, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=params.lr_factor, patience=params.lr_patience
    )
    autocast, scaler = autocast_for(device, params.precision)
    corrupt_gen = torch.Generator().manual_seed(params.seed + 1)
    val_input = _corrupted_copy(val_x, params, seed=params.seed + 2)
    n = train_x.shape[0]
    batch_size = min(params.batch_size, n)

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
        state = {k: saved[k] for k in state}
    start = time.perf_counter() - state["seconds"]
    epoch = state["epoch"]
    while not state["done"] and epoch < params.epochs:
        epoch += 1
        model.train()
        order = torch.randperm(n, generator=gen).to(device)
        total = torch.zeros((), device=device)
        # drop a last partial batch of one image: BatchNorm cannot train on a single sample
        stops = [s for s in range(0, n, batch_size) if min(s + batch_size, n) - s > 1 or n == 1]
        for s in stops:
            x = to_float(train_x[order[s : s + batch_size]])
            loss = train_step(model, optimizer, x, params, corrupt_gen, autocast, scaler)
            total += loss * x.shape[0]
            state["seen"] += x.shape[0]
        trained = sum(min(s + batch_size, n) - s for s in stops)
        train_loss = float(total) / max(trained, 1)
        val_loss = evaluate_loss(model, val_input, val_x, batch_size, device, params.ssim_weight,
                                 params.precision)
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            if resume is not None:
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
        if resume is not None:
            io.save_torch(resume, {
                **state, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                "gen": gen.get_state(), "corrupt_gen": corrupt_gen.get_state(),
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
               corrupt_gen: torch.Generator, autocast: Any, scaler: torch.amp.GradScaler | None) -> Tensor:
    """One optimisation step on the clean float batch ``x``: corrupt it (per ``model.corruption``),
    reconstruct, L1 (+ SSIM) loss against the clean batch, clip, step. Returns the loss on the device
    (no host synchronisation)."""
    inp = x
    if params.corruption != "none":
        inp, _ = corrupt_batch(x, params.corruption, corrupt_gen, params.corruption_probability)
        inp = inp.contiguous(memory_format=torch.channels_last)
    with autocast:
        recon = model(inp).float()
    loss = reconstruction_loss(recon, x, params.ssim_weight)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if params.grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss.detach()


def reconstruction_loss(recon: Tensor, target: Tensor, ssim_weight: float) -> Tensor:
    """Mean L1 error, plus ``ssim_weight`` x mean (1 - SSIM) on grayscale when the weight is positive."""
    loss = (recon - target).abs().mean()
    if ssim_weight > 0:
        loss = loss + ssim_weight * (1.0 - ssim_map(rgb_to_gray(recon), rgb_to_gray(target))).mean()
    return loss


def _corrupted_copy(images: Tensor, params: ModelParams, seed: int) -> Tensor:
    """The validation inputs: corrupted once with a fixed seed (so the loss is comparable across epochs),
    as uint8 NCHW like ``images``; unchanged when training without corruption."""
    if params.corruption == "none":
        return images
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty_like(images)
    for s in range(0, images.shape[0], 64):
        x = images[s : s + 64].float() / 255.0
        corrupted, _ = corrupt_batch(x, params.corruption, gen, params.corruption_probability)
        out[s : s + 64] = (corrupted * 255.0).round().clamp(0, 255).to(torch.uint8)
    return out


@torch.inference_mode()
def evaluate_loss(model: nn.Module, inputs: Tensor, targets: Tensor, batch_size: int, device: torch.device,
                  ssim_weight: float, precision: str = "auto") -> float:
    """Mean training objective of ``model`` (eval mode) reconstructing uint8 NCHW ``targets`` from ``inputs``."""
    model.eval()
    autocast, _ = autocast_for(device, precision)
    total = 0.0
    for s in range(0, inputs.shape[0], batch_size):
        x, y = to_float(inputs[s : s + batch_size]), to_float(targets[s : s + batch_size])
        with autocast:
            recon = model(x).float()
        total += float(reconstruction_loss(recon, y, ssim_weight)) * x.shape[0]
    return total / inputs.shape[0]


def train_and_save(
    params: Params,
    model_name: str,
    models_dir: Path,
    log: Log = print,
    resume_dir: Path | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train ``model_name`` per category (or one joint model) on the prepared split and write the
    checkpoints into ``models_dir`` (replaced whole, atomically).

    With ``resume_dir``, each model's training state is kept there after every epoch, so a killed run
    resumes where it stopped when params and data are unchanged; remove it with :func:`clear_resume`
    once the stage's outputs are written. Returns the metrics (per category: best validation loss, epochs,
    parameters, seconds, images/s) and the loss-curve rows for the plots CSV.
    """
    configure_threads(params.model.num_threads)
    device = select_device(params.model.device)
    prepared = Path(params.data.prepared_dir)
    train_split = read_split(prepared, "train")
    val_split = read_split(prepared, "val")
    _check_prepared(train_split.images, params.data.image_size, prepared / "train.npy")
    groups: list[tuple[str | None, list[str]]] = (
        [(c, [c]) for c in params.data.categories] if params.model.per_category else [(None, list(params.data.categories))]
    )
    arch = params.arch(model_name)
    digests = {s: manifest_digest(prepared, s) for s in ("train", "val")}
    log(f"training {model_name} on {device} ({'per category' if params.model.per_category else 'one joint model'})")
    metrics: dict[str, Any] = {"device": str(device), "per_category": params.model.per_category, "categories": {}}
    rows: list[dict[str, Any]] = []
    with io.atomic_dir(models_dir) as tmp_dir:
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
            result = train_autoencoder(model, np.asarray(train.images), np.asarray(val.images), params.model, device,
                                       log, tag=f"{model_name}/{label}",
                                       resume=resume_dir / f"{label}.pt" if resume_dir else None,
                                       fingerprint=fingerprint)
            meta = {
                **recipe,
                "best_val_loss": result.best_val_loss,
                "best_epoch": result.best_epoch,
                "epochs_run": result.epochs_run,
            }
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


def clear_resume(resume_dir: Path) -> None:
    """Remove the resume states once a training stage has written all its outputs."""
    shutil.rmtree(resume_dir, ignore_errors=True)


def _check_prepared(images: np.ndarray, size: int, path: Path) -> None:
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise DataError(
            f"{path}: cached images are {tuple(images.shape[1:])}, expected ({size}, {size}, 3) from "
            "data.image_size; rerun prepare-split (dvc repro)"
        )
