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


def test_image_source_gives_the_same_batches_from_a_memory_map_and_from_a_resident_copy(tmp_path):
    """The per-batch path (CPU, memory map) and the whole-array path (what CUDA uses when it fits)."""
    from aead.training import ImageSource

    images = np.random.default_rng(0).integers(0, 256, size=(10, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    lazy = ImageSource(mapped, torch.device("cpu"))
    whole = ImageSource(mapped, torch.device("cpu"), resident=True)
    assert lazy.resident is None and whole.resident is not None and len(lazy) == len(whole) == 10
    for rows in (torch.tensor([7, 2, 2, 9]), slice(3, 8), np.array([0])):
        a, b = lazy.batch(rows), whole.batch(rows)
        assert a.dtype == torch.float32 and a.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        index = rows if isinstance(rows, slice) else np.asarray(rows)
        expected = torch.from_numpy(images[index]).permute(0, 3, 1, 2).float() / 255.0
        torch.testing.assert_close(a, expected, rtol=0, atol=0)
