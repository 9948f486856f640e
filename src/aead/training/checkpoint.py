"""Checkpoints: each trained thing's weights plus everything needed to use and audit it, one file per category.

``models/<model>/<category>.pt``             an autoencoder (stage ``train-<model>``; ``joint.pt`` for one model of
                                              all categories, the seed's setting)
``models/heads/<model>/<category>.pt``       its segmentation head (stage ``train-head@<model>``)
``models/banks/<model>/<category>.pt``       the memory bank of its encoder (stage ``build-bank@<model>``)
``models/pretrained/<category>.pt``          the memory bank of a frozen ImageNet backbone and the feature discriminator
                                              trained on its features (``build-pretrained-bank``); the backbone's
                                              weights are not stored, they come from their package
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aead import io
from aead.models.backbones import build_backbone
from aead.errors import CheckpointError
from aead.models.torch_model import (BrightnessModel, FeatureDiscriminator, PatchMemory, PretrainedPatchMemory, SegmentationHead, build_head,
                              build_model)

FORMAT_VERSION = 2
JOINT = "joint"
KINDS = ("autoencoder", "segmentation_head", "encoder_bank", "pretrained_bank")


@dataclass
class Checkpoint:
    """A loaded autoencoder (eval mode) and its recorded metadata."""

    model: nn.Module
    meta: dict[str, Any]

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def categories(self) -> list[str]:
        return list(self.meta["categories"])


def checkpoint_name(category: str | None) -> str:
    """File name of the checkpoint for ``category`` (None: the joint model)."""
    return f"{category or JOINT}.pt"


def _save(path: str | Path, kind: str, meta: dict[str, Any], state_dict: dict[str, Any],
          required: tuple[str, ...]) -> None:
    for key in required:
        if key not in meta:
            raise ValueError(f"{kind} checkpoint metadata needs '{key}'")
    io.save_torch(path, {"format": FORMAT_VERSION, "kind": kind, "meta": meta,
                         "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}})


def _load(path: str | Path, kind: str, device: torch.device | str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {kind.replace('_', ' ')} not found; run the pipeline first (dvc repro)")
    try:
        raw = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises many types for damaged files
        raise CheckpointError(f"{path}: cannot read checkpoint ({err})") from err
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_VERSION or "meta" not in raw:
        raise CheckpointError(f"{path}: not a checkpoint of this version of the project (format {FORMAT_VERSION} "
                              "expected); rerun the pipeline (dvc repro)")
    if raw.get("kind") != kind:
        raise CheckpointError(f"{path}: holds a checkpoint of kind '{raw.get('kind')}', expected '{kind}'")
    return raw


def _fill(module: nn.Module, state_dict: dict[str, Any], path: Path | str, what: str) -> None:
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: {what}: {err}") from err


def save_checkpoint(path: str | Path, state_dict: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write an autoencoder's weights and metadata atomically. ``meta`` must hold model, base_channels, image_size
    and categories; the rest (params, manifest digests, training summary) is kept as given."""
    _save(path, "autoencoder", meta, state_dict, ("model", "base_channels", "image_size", "categories"))


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu", expect_model: str | None = None,
                    expect_image_size: int | None = None) -> Checkpoint:
    """Load and check an autoencoder; mismatches with what the caller expects raise :class:`CheckpointError`."""
    raw = _load(path, "autoencoder", device)
    meta = raw["meta"]
    if expect_model is not None and meta["model"] != expect_model:
        raise CheckpointError(f"{path}: holds a '{meta['model']}' model, expected '{expect_model}'")
    if expect_image_size is not None and int(meta["image_size"]) != expect_image_size:
        raise CheckpointError(
            f"{path}: trained at image size {meta['image_size']}, but the data is {expect_image_size} px; "
            "retrain (dvc repro) or set data.image_size to match"
        )
    model = build_model(meta["model"], int(meta["base_channels"]))
    _fill(model, raw["state_dict"], path,
          f"weights do not fit a '{meta['model']}' model with base_channels {meta['base_channels']}")
    return Checkpoint(model=model.to(device).eval(), meta=meta)


def save_head(path: str | Path, head: SegmentationHead, meta: dict[str, Any]) -> None:
    """Write a segmentation head; ``meta`` must hold its ``base_channels``."""
    _save(path, "segmentation_head", meta, head.state_dict(), ("base_channels",))


def load_head(path: str | Path, device: torch.device | str = "cpu") -> SegmentationHead:
    raw = _load(path, "segmentation_head", device)
    head = build_head(int(raw["meta"]["base_channels"]))
    _fill(head, raw["state_dict"], path, f"weights do not fit base_channels {raw['meta']['base_channels']}")
    return head.to(device).eval()


def save_encoder_bank(path: str | Path, memory: PatchMemory, meta: dict[str, Any]) -> None:
    """Write an encoder memory bank; its shape is recorded in the metadata."""
    meta = {**meta, "bank_size": int(memory.bank.shape[0]), "channels": int(memory.bank.shape[1]),
            "feature_size": memory.feature_size, "border_padding": memory.padding}
    _save(path, "encoder_bank", meta, memory.state_dict(), ())


def load_encoder_bank(path: str | Path, device: torch.device | str = "cpu") -> PatchMemory:
    raw = _load(path, "encoder_bank", device)
    meta = raw["meta"]
    memory = PatchMemory(int(meta["bank_size"]), int(meta["channels"]), int(meta["feature_size"]),
                         int(meta["border_padding"]))
    _fill(memory, raw["state_dict"], path, f"memory bank does not fit its recorded shape {meta}")
    return memory.to(device).eval()


def save_pretrained_bank(path: str | Path, memory: PretrainedPatchMemory, meta: dict[str, Any]) -> None:
    """Write a pretrained memory bank, with its feature discriminator and part scales if it has one and its brightness
    model and fusion scales if it has one (the backbone is not written: it is rebuilt from its package when loaded).
    ``meta`` must hold backbone, layers, neighbourhood and the working ``shape`` (height, width)."""
    disc, bright = memory.discriminator, memory.brightness
    meta = {**meta, "bank_size": int(memory.bank.shape[0]), "channels": int(memory.bank.shape[1]),
            "border_padding": memory.padding, "discriminator": 0 if disc is None else int(disc.hidden.out_features),
            "search_dim": int(memory.search_projection.shape[1]), "search_candidates": memory.search_candidates,
            "brightness_grid": [] if bright is None else list(bright.mean.shape),
            "brightness_sigma_px": 0.0 if bright is None else bright.sigma}
    state = {"bank": memory.bank}
    if memory.search_candidates:
        state.update({"search_mean": memory.search_mean, "search_projection": memory.search_projection})
    if disc is not None:
        state.update({"part_scales": memory.part_scales,
                      **{f"discriminator.{k}": v for k, v in disc.state_dict().items()}})
    if bright is not None:
        state.update({"fusion_scales": memory.fusion_scales, "brightness.mean": bright.mean,
                      "brightness.std": bright.std})
    _save(path, "pretrained_bank", meta, state, ("backbone", "layers", "neighbourhood", "shape"))


def load_pretrained_bank(path: str | Path, device: torch.device | str = "cpu"
                         ) -> tuple[PretrainedPatchMemory, dict[str, Any]]:
    """The pretrained memory (backbone with its packaged weights, the bank, the discriminator with the part scales
    and the brightness model with the fusion scales if it was built with them) and its metadata."""
    raw = _load(path, "pretrained_bank", device)
    meta = raw["meta"]
    hidden = int(meta.get("discriminator", 0))
    channels = int(meta["channels"])
    disc = FeatureDiscriminator(channels, hidden) if hidden else None
    grid = tuple(int(v) for v in meta.get("brightness_grid", []))
    bright = BrightnessModel(float(meta["brightness_sigma_px"]), grid) if grid else None  # type: ignore[arg-type]
    memory = PretrainedPatchMemory(build_backbone(meta["backbone"]), tuple(meta["layers"]),
                                   int(meta["neighbourhood"]), int(meta["bank_size"]), channels,
                                   int(meta["border_padding"]), disc, bright)
    state = raw["state_dict"]
    try:
        memory.bank.copy_(state["bank"])
        if int(meta.get("search_candidates", 0)):
            memory.set_search(state["search_mean"].float(), state["search_projection"].float(),
                              int(meta["search_candidates"]))
        if disc is not None:
            memory.part_scales.copy_(state["part_scales"])
            disc.load_state_dict({k.removeprefix("discriminator."): v for k, v in state.items()
                                  if k.startswith("discriminator.")})
        if bright is not None:
            memory.fusion_scales.copy_(state["fusion_scales"])
            bright.mean.copy_(state["brightness.mean"])
            bright.std.copy_(state["brightness.std"])
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: memory bank does not fit its recorded shape: {err}") from err
    return memory.to(device).eval(), meta


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
        "run the pipeline first (dvc repro)"
    )
