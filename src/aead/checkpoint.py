"""Checkpoints: a trained model's weights plus everything needed to use and audit it.

One file per trained model under ``models/<model>/``: ``<category>.pt`` when training per category,
``joint.pt`` for one model of all categories (the seed's setting). A checkpoint also holds the segmentation
head trained on top of the autoencoder when ``segmentation.steps`` > 0 (its settings in ``meta["segmentation"]``),
and the memory bank of encoder patch features when ``memory_bank.coreset_ratio`` > 0 (``meta["memory_bank"]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aead import io
from aead.errors import CheckpointError
from aead.torch_model import PatchMemory, SegmentationHead, build_head, build_model

FORMAT_VERSION = 1
JOINT = "joint"


@dataclass
class Checkpoint:
    """A loaded checkpoint: the ready model (eval mode) and its recorded metadata."""

    model: nn.Module
    meta: dict[str, Any]
    head: SegmentationHead | None = None
    memory: PatchMemory | None = None

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def categories(self) -> list[str]:
        return list(self.meta["categories"])


def checkpoint_name(category: str | None) -> str:
    """File name of the checkpoint for ``category`` (None: the joint model)."""
    return f"{category or JOINT}.pt"


def save_checkpoint(path: str | Path, state_dict: dict[str, Any], meta: dict[str, Any],
                    head_state_dict: dict[str, Any] | None = None, memory: PatchMemory | None = None) -> None:
    """Write weights and metadata atomically. ``meta`` must hold model, base_channels, image_size,
    categories (and ``segmentation.base_channels`` with a head); the rest (params, manifest digests, training
    summary) is kept as given. The memory bank's shape is recorded in ``meta["memory_bank"]``."""
    for key in ("model", "base_channels", "image_size", "categories"):
        if key not in meta:
            raise ValueError(f"checkpoint metadata needs '{key}'")
    raw = {"format": FORMAT_VERSION, "meta": meta, "state_dict": state_dict}
    if head_state_dict is not None:
        if "base_channels" not in meta.get("segmentation", {}):
            raise ValueError("checkpoint metadata needs 'segmentation.base_channels' with a segmentation head")
        raw["head_state_dict"] = head_state_dict
    if memory is not None:
        raw["meta"] = {**meta, "memory_bank": {**meta.get("memory_bank", {}), "bank_size": int(memory.bank.shape[0]),
                                               "channels": int(memory.bank.shape[1]),
                                               "feature_size": memory.feature_size, "border_padding": memory.padding}}
        raw["memory_state_dict"] = {k: v.detach().cpu() for k, v in memory.state_dict().items()}
    io.save_torch(path, raw)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu", expect_model: str | None = None,
                    expect_image_size: int | None = None) -> Checkpoint:
    """Load and check a checkpoint; mismatches with what the caller expects raise :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; run the training stage first (dvc repro)")
    try:
        raw = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises many types for damaged files
        raise CheckpointError(f"{path}: cannot read checkpoint ({err})") from err
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_VERSION or "meta" not in raw:
        raise CheckpointError(f"{path}: not a checkpoint of this project (format {FORMAT_VERSION} expected)")
    meta = raw["meta"]
    if expect_model is not None and meta["model"] != expect_model:
        raise CheckpointError(f"{path}: holds a '{meta['model']}' model, expected '{expect_model}'")
    if expect_image_size is not None and int(meta["image_size"]) != expect_image_size:
        raise CheckpointError(
            f"{path}: trained at image size {meta['image_size']}, but the data is {expect_image_size} px; "
            "retrain (dvc repro) or set data.image_size to match"
        )
    model = build_model(meta["model"], int(meta["base_channels"]))
    try:
        model.load_state_dict(raw["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(
            f"{path}: weights do not fit a '{meta['model']}' model with base_channels {meta['base_channels']}: {err}"
        ) from err
    model.to(device).eval()
    head = None
    if "head_state_dict" in raw:
        head = build_head(int(meta["segmentation"]["base_channels"]))
        try:
            head.load_state_dict(raw["head_state_dict"])
        except RuntimeError as err:
            raise CheckpointError(f"{path}: segmentation head weights do not fit base_channels "
                                  f"{meta['segmentation']['base_channels']}: {err}") from err
        head.to(device).eval()
    memory = None
    if "memory_state_dict" in raw:
        shape = meta.get("memory_bank", {})
        try:
            memory = PatchMemory(int(shape["bank_size"]), int(shape["channels"]), int(shape["feature_size"]),
                                 int(shape.get("border_padding", 0)))  # banks from before the key: no mirroring
            memory.load_state_dict(raw["memory_state_dict"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{path}: memory bank does not fit its recorded shape {shape}: {err}") from err
        memory.to(device).eval()
    return Checkpoint(model=model, meta=meta, head=head, memory=memory)


def find_checkpoint(model_dir: str | Path, category: str) -> Path:
    """The checkpoint that serves ``category``: its own if trained per category, else the joint one."""
    model_dir = Path(model_dir)
    own = model_dir / checkpoint_name(category)
    if own.is_file():
        return own
    joint = model_dir / checkpoint_name(None)
    if joint.is_file():
        return joint
    raise CheckpointError(
        f"{model_dir}: no checkpoint for category '{category}' (expected {own.name} or {joint.name}); "
        "run the training stage first (dvc repro)"
    )
