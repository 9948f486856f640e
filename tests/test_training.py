from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from aead.training.checkpoint import load_checkpoint, save_checkpoint
from aead.errors import CheckpointError, TrainingError
from aead.params import ModelParams, SegmentationParams
from aead.models.torch_model import build_model
from aead.training.loops import flip_rotate, focal_loss, train_autoencoder, train_segmentation_head

PARAMS = ModelParams(per_category=True, epochs=3, batch_size=4, lr=1e-2, weight_decay=0.0, patience=5,
                     lr_factor=0.5, lr_patience=1, grad_clip=1.0,
                     corruption="perlin", corruption_probability=0.75, ssim_weight=1.0, seed=0, device="cpu",
                     precision="fp32", deterministic=True, num_threads=0, launcher="python", flip_rotate=())


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


def test_flip_rotate_gives_the_eight_symmetries_of_a_square():
    x = torch.rand(8, 3, 5, 5)
    x[:] = x[0]  # the same asymmetric image eight times
    out = flip_rotate(x, torch.arange(8))
    for code in range(8):
        ref = x[code].numpy()
        if code & 4:
            ref = np.flip(ref, axis=-1)
        assert np.array_equal(out[code].numpy(), np.rot90(ref, code & 3, axes=(-2, -1)))
    assert torch.equal(out[0], x[0])
    assert len({out[i].numpy().tobytes() for i in range(8)}) == 8
    assert torch.equal(flip_rotate(x, torch.zeros(8, dtype=torch.long)), x)
    with pytest.raises(ValueError, match="square"):
        flip_rotate(torch.rand(2, 3, 4, 6), torch.arange(2))
    with pytest.raises(ValueError, match="one code per image"):
        flip_rotate(x, torch.arange(3))


def test_augmented_training_is_deterministic_and_differs_from_plain_training():
    def train(augment: bool):
        return train_autoencoder(build_model("baseline", 4, seed=0), images(9), images(3, seed=1), PARAMS,
                                 torch.device("cpu"), log=lambda m: None, tag="t", augment=augment)

    a, b, plain = train(True), train(True), train(False)
    assert a.history == b.history
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert [h["train_loss"] for h in a.history] != [h["train_loss"] for h in plain.history]
    heads = [train_segmentation_head(build_model("baseline", 4, seed=0), images(9), SEG, PARAMS, torch.device("cpu"),
                                     log=lambda m: None, augment=aug) for aug in (True, True, False)]
    assert heads[0].final_loss == heads[1].final_loss != heads[2].final_loss


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
    from aead.training.numerics import memory_format
    from aead.training.loops import ImageSource

    images = np.random.default_rng(0).integers(0, 256, size=(10, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    lazy = ImageSource(mapped, torch.device("cpu"))
    whole = ImageSource(mapped, torch.device("cpu"), resident=True)
    assert lazy.resident is None and whole.resident is not None and len(lazy) == len(whole) == 10
    for rows in (torch.tensor([7, 2, 2, 9]), slice(3, 8), np.array([0])):
        a, b = lazy.batch(rows), whole.batch(rows)
        assert a.dtype == torch.float32 and a.is_contiguous(memory_format=memory_format())
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        index = rows if isinstance(rows, slice) else np.asarray(rows)
        expected = torch.from_numpy(images[index]).permute(0, 3, 1, 2).float() / 255.0
        torch.testing.assert_close(a, expected, rtol=0, atol=0)


SEG = SegmentationParams(steps=40, batch_size=4, lr=1e-2, base_channels=4, corruption="perlin",
                         corruption_probability=0.5)


def test_focal_loss_reference_values():
    """gamma 0 is plain binary cross-entropy; with gamma 2 a pixel predicted with p = 0.9 for its true class
    weighs (1 - 0.9)^2 x -log(0.9) (values by hand)."""
    logits = torch.tensor([[2.0, -1.0], [0.5, -3.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert float(focal_loss(logits, target, gamma=0.0)) == pytest.approx(float(bce), rel=1e-6)
    p = torch.tensor(0.9)
    one = focal_loss(torch.logit(p).reshape(1, 1), torch.ones(1, 1))
    assert float(one) == pytest.approx(0.01 * -np.log(0.9), rel=1e-5)
    assert float(focal_loss(torch.tensor([[-20.0]]), torch.zeros(1, 1))) < 1e-12


def test_segmentation_head_learns_the_synthetic_defects_and_is_deterministic():
    """On a frozen autoencoder, 40 steps lower the focal loss; the same seed gives the same head."""
    ae = build_model("baseline", 4, seed=0)
    logs: list[str] = []
    a = train_segmentation_head(ae, images(12), SEG, PARAMS, torch.device("cpu"), log=logs.append, tag="t")
    b = train_segmentation_head(build_model("baseline", 4, seed=0), images(12), SEG, PARAMS, torch.device("cpu"),
                                log=lambda m: None, tag="t")
    first, last = (float(line.rsplit(" ", 1)[1]) for line in (logs[0], logs[-1]))
    assert a.steps == 40 and len(logs) == 1 and "step 40/40" in logs[0]
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k])
    untrained = focal_loss_of(build_model("baseline", 4, seed=0), None)
    trained = focal_loss_of(build_model("baseline", 4, seed=0), a.state_dict)
    assert trained < 0.5 * untrained, (trained, untrained)
    assert math.isfinite(first) and first == last and a.final_loss == pytest.approx(last, abs=1e-5)


def focal_loss_of(ae: torch.nn.Module, head_state: dict | None) -> float:
    """The focal loss of a head on fresh corrupted images (a fixed draw, eval mode)."""
    from aead.data.corruption import corrupt_batch
    from aead.models.torch_model import build_head

    head = build_head(4, seed=PARAMS.seed + 3)
    if head_state is not None:
        head.load_state_dict(head_state)
    head.eval()
    ae.eval()
    x = torch.from_numpy(images(8, seed=5)).permute(0, 3, 1, 2).float() / 255.0
    xc, mask = corrupt_batch(x, "perlin", torch.Generator().manual_seed(9), probability=0.5)
    with torch.no_grad():
        return float(focal_loss(head(xc, ae(xc)), mask))


def test_segmentation_head_round_trip(tmp_path):
    from aead.training.checkpoint import load_head, save_head
    from aead.models.torch_model import build_head

    head = build_head(4, seed=1).eval()
    save_head(tmp_path / "x.pt", head, {"base_channels": 4})
    loaded = load_head(tmp_path / "x.pt")
    x = torch.rand(2, 3, 16, 16)
    assert torch.equal(loaded(x, x), head(x, x))
    with pytest.raises(ValueError, match="segmentation_head checkpoint metadata needs 'base_channels'"):
        save_head(tmp_path / "y.pt", head, {})
    save_head(tmp_path / "z.pt", head, {"base_channels": 8})
    with pytest.raises(CheckpointError, match="z.pt: weights do not fit base_channels 8"):
        load_head(tmp_path / "z.pt")
    with pytest.raises(CheckpointError, match="x.pt: holds a checkpoint of kind 'segmentation_head', expected "
                                              "'autoencoder'"):
        load_checkpoint(tmp_path / "x.pt")
