from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from aead.checkpoint import load_checkpoint, save_checkpoint
from aead.errors import CheckpointError, TrainingError
from aead.params import ModelParams
from aead.torch_model import build_model
from aead.training import train_autoencoder

PARAMS = ModelParams(per_category=True, epochs=3, batch_size=4, lr=1e-2, weight_decay=0.0, patience=5,
                     lr_factor=0.5, lr_patience=1, grad_clip=1.0,
                     corruption="perlin", corruption_probability=0.75, ssim_weight=1.0, seed=0, device="cpu",
                     precision="fp32", num_threads=0, launcher="python")


def images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, (1, size, size, 3))
    return np.clip(base + rng.integers(-10, 10, (n, size, size, 3)), 0, 255).astype(np.uint8)


def test_training_lowers_the_loss_and_is_deterministic():
    a = train_autoencoder(build_model("baseline", 4, seed=0), images(9), images(3, seed=1), PARAMS, torch.device("cpu"),
                          log=lambda m: None, tag="t")
    b = train_autoencoder(build_model("baseline", 4, seed=0), images(9), images(3, seed=1), PARAMS, torch.device("cpu"),
                          log=lambda m: None, tag="t")
    assert a.history[-1]["train_loss"] < a.history[0]["train_loss"]
    assert [h["val_loss"] for h in a.history] == [h["val_loss"] for h in b.history]
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k])
    assert a.best_val_loss == min(h["val_loss"] for h in a.history)


def test_early_stopping_stops():
    p = dataclasses.replace(PARAMS, epochs=50, patience=1, lr=1e-6)
    r = train_autoencoder(build_model("multiscale", 4), images(6), images(2, seed=1), p, torch.device("cpu"),
                          log=lambda m: None, tag="t")
    assert r.epochs_run < 50


def test_divergence_stops_with_a_clear_error():
    p = dataclasses.replace(PARAMS, lr=1e12, grad_clip=0.0, epochs=5)
    with pytest.raises(TrainingError, match="lower model.lr"):
        train_autoencoder(build_model("baseline", 4), images(8), images(2, seed=1), p, torch.device("cpu"),
                          log=lambda m: None, tag="t")


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    model = build_model("multiscale", 4)
    meta = {"model": "multiscale", "base_channels": 4, "image_size": 16, "categories": ["x"]}
    save_checkpoint(tmp_path / "x.pt", model.state_dict(), meta)
    ck = load_checkpoint(tmp_path / "x.pt", expect_model="multiscale", expect_image_size=16)
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(ck.model(x), model.eval()(x))
    with pytest.raises(CheckpointError, match="holds a 'multiscale' model, expected 'baseline'"):
        load_checkpoint(tmp_path / "x.pt", expect_model="baseline")
    with pytest.raises(CheckpointError, match="trained at image size 16"):
        load_checkpoint(tmp_path / "x.pt", expect_image_size=32)
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(tmp_path / "bad.pt")
