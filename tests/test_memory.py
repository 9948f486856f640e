"""The PatchCore-style memory bank: patch features, nearest-patch distances, greedy coreset, fusion statistics and
checkpoint round trip, against brute-force references."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from aead.checkpoint import load_checkpoint, save_checkpoint
from aead.errors import CheckpointError
from aead.memory_bank import SCALE_FLOOR, build_memory, greedy_coreset, mean_and_peak_scale
from aead.params import MemoryBankParams, ModelParams
from aead.torch_model import PatchMemory, build_model, patch_features

PARAMS = ModelParams(per_category=True, epochs=1, batch_size=4, lr=1e-3, weight_decay=0.0, patience=1, lr_factor=0.5,
                     lr_patience=1, grad_clip=1.0, corruption="none", corruption_probability=0.0, ssim_weight=0.0,
                     seed=0, device="cpu", precision="fp32", num_threads=0, launcher="python", flip_rotate=())


def images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def to_batch(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


@pytest.mark.parametrize("feature_size", [4, 8, 16])
def test_patch_features_bring_three_levels_to_one_grid(feature_size):
    """At 16 px the levels are 16, 8 and 4 px: pooled down, kept or upsampled to the grid; 7c channels."""
    encoder = build_model("baseline", 4, seed=0).encoder.eval()
    with torch.no_grad():
        f = patch_features(encoder, to_batch(images(2)), feature_size)
        x1, x2, x3 = encoder.levels(to_batch(images(2)))
    assert f.shape == (2, 7 * 4, feature_size, feature_size)
    # the third level's 3x3 mean at a centre patch, when that level is already at the grid size
    if feature_size == 4:
        centre = x3[:, :, 0:3, 0:3].mean(dim=(2, 3))
        torch.testing.assert_close(f[:, 12:, 1, 1], centre)


def test_mirrored_border_makes_the_patches_of_a_uniform_image_alike():
    """A uniform image has one texture everywhere: with a mirrored border wider than the deepest level's receptive
    field every patch gets the same features, while the zero padding alone makes the border patches differ."""
    encoder = build_model("baseline", 4, seed=0).encoder.eval()
    x = torch.full((1, 3, 32, 32), 0.6)
    with torch.no_grad():
        zero = patch_features(encoder, x, 8)
        mirrored = patch_features(encoder, x, 8, padding=28)
    centre = mirrored[:, :, 4:5, 4:5].expand_as(mirrored)
    torch.testing.assert_close(mirrored, centre)
    assert (zero - zero[:, :, 4:5, 4:5]).abs().amax() > 100 * (mirrored - centre).abs().amax() + 1e-3
    assert torch.equal(patch_features(encoder, x, 8, padding=0), zero)


@pytest.mark.parametrize("padding", [-4, 2, 6])
def test_patch_features_refuse_a_padding_that_does_not_fall_on_every_level(padding):
    encoder = build_model("baseline", 4, seed=0).encoder.eval()
    with pytest.raises(ValueError, match="padding must be a non-negative multiple of 4"):
        patch_features(encoder, to_batch(images(1)), 8, padding=padding)


@pytest.mark.parametrize("padding", [0, 4])
def test_distance_map_equals_brute_force_nearest_neighbour(padding):
    encoder = build_model("multiscale", 4, seed=1).encoder.eval()
    x = to_batch(images(3, seed=1))
    memory = PatchMemory(bank_size=50, channels=28, feature_size=8, padding=padding)
    memory.bank.copy_(torch.randn(50, 28, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        d = memory.distance_map(encoder, x)
        f = patch_features(encoder, x, 8, padding).permute(0, 2, 3, 1).reshape(-1, 28)
    brute = torch.cdist(f.double(), memory.bank.double()).min(dim=1).values.float().reshape(3, 1, 8, 8)
    expected = torch.nn.functional.interpolate(brute, size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    assert d.shape == (3, 16, 16)
    torch.testing.assert_close(d, expected, rtol=1e-4, atol=1e-4)


def test_an_image_whose_patches_are_in_the_bank_is_at_distance_zero():
    encoder = build_model("baseline", 4, seed=0).encoder.eval()
    x = to_batch(images(2))
    with torch.no_grad():
        f = patch_features(encoder, x[:1], 8).permute(0, 2, 3, 1).reshape(-1, 28)
        memory = PatchMemory(len(f), 28, 8)
        memory.bank.copy_(f)
        d = memory.distance_map(encoder, x)
    assert float(d[0].max()) < 1e-3 < float(d[1].mean())


def test_greedy_coreset_covers_separated_clusters_and_is_deterministic():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0] * 40, [50.0] * 40, [-50.0] * 40])
    points = torch.cat([c + torch.randn(30, 40, generator=gen) for c in centres])
    chosen = greedy_coreset(points, 3, seed=5)
    assert sorted((chosen // 30).tolist()) == [0, 1, 2], "one patch from each cluster"
    assert torch.equal(chosen, greedy_coreset(points, 3, seed=5))
    assert len(set(greedy_coreset(points, 60, seed=1).tolist())) == 60, "no patch chosen twice"
    assert torch.equal(greedy_coreset(points, 90, seed=0), torch.arange(90))
    with pytest.raises(ValueError, match="between 1 and 90"):
        greedy_coreset(points, 0, seed=0)


def test_peak_scale_is_the_mean_image_maximum_above_the_pixel_mean():
    maps = torch.tensor([[0.0, 1.0, 0.0, 3.0], [1.0, 1.0, 1.0, 1.0]])  # pixel mean 1, image maxima 3 and 1
    mean, scale = mean_and_peak_scale(maps)
    assert mean.dtype == torch.float64 and (float(mean), float(scale)) == (1.0, 1.0)
    _, flat = mean_and_peak_scale(torch.full((3, 5), 0.25))
    assert float(flat) == SCALE_FLOOR, "a constant map does not divide by zero"


def test_build_memory_keeps_the_ratio_and_measures_fusion_statistics_on_validation_images():
    ae = build_model("baseline", 4, seed=0).eval()
    head = None
    bank = MemoryBankParams(coreset_ratio=0.25, feature_size=8, border_padding=4)
    train, val = images(6), images(3, seed=2)
    a = build_memory(ae, head, train, val, bank, PARAMS, torch.device("cpu"), log=lambda m: None)
    b = build_memory(ae, head, train, val, bank, PARAMS, torch.device("cpu"), log=lambda m: None)
    assert a.patches == 6 * 64 and a.memory.bank.shape == (96, 28)
    assert torch.equal(a.memory.bank, b.memory.bank), "deterministic"
    with torch.no_grad():
        d = a.memory.distance_map(ae.encoder, to_batch(val)).double()
    k_mean, k_scale, s_mean, s_scale = a.memory.fusion.tolist()
    peaks = d.flatten(1).max(dim=1).values
    assert k_mean == pytest.approx(float(d.mean()), rel=1e-5)
    assert k_scale == pytest.approx(float(peaks.mean() - d.mean()), rel=1e-5), "mean validation peak above the mean"
    assert (s_mean, s_scale) == (0.0, 1.0), "without a head the seg terms are left as they are"


def test_checkpoint_round_trip_with_a_memory_bank(tmp_path):
    model = build_model("baseline", 4, seed=0)
    memory = PatchMemory(10, 28, 8, padding=4)
    memory.bank.copy_(torch.arange(280.0).reshape(10, 28))
    memory.fusion.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    meta = {"model": "baseline", "base_channels": 4, "image_size": 16, "categories": ["x"],
            "memory_bank": dataclasses.asdict(MemoryBankParams(coreset_ratio=0.5, feature_size=8, border_padding=4))}
    save_checkpoint(tmp_path / "x.pt", model.state_dict(), meta, memory=memory)
    ck = load_checkpoint(tmp_path / "x.pt")
    assert ck.memory is not None and ck.head is None
    assert torch.equal(ck.memory.bank, memory.bank) and torch.equal(ck.memory.fusion, memory.fusion)
    assert ck.memory.feature_size == 8 and ck.memory.padding == 4
    assert ck.meta["memory_bank"] == {"coreset_ratio": 0.5, "feature_size": 8, "border_padding": 4, "bank_size": 10,
                                      "channels": 28}
    assert "bank_size" not in meta["memory_bank"], "the caller's meta is not changed"
    raw = torch.load(tmp_path / "x.pt", weights_only=True)
    raw["meta"]["memory_bank"]["bank_size"] = 11
    torch.save(raw, tmp_path / "y.pt")
    with pytest.raises(CheckpointError, match=r"y\.pt: memory bank does not fit its recorded shape"):
        load_checkpoint(tmp_path / "y.pt")


def test_a_bank_saved_before_border_padding_existed_loads_without_mirroring(tmp_path):
    model = build_model("baseline", 4, seed=0)
    memory = PatchMemory(10, 28, 8, padding=4)
    meta = {"model": "baseline", "base_channels": 4, "image_size": 16, "categories": ["x"]}
    save_checkpoint(tmp_path / "x.pt", model.state_dict(), meta, memory=memory)
    raw = torch.load(tmp_path / "x.pt", weights_only=True)
    del raw["meta"]["memory_bank"]["border_padding"]
    torch.save(raw, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "x.pt").memory.padding == 4
    assert load_checkpoint(tmp_path / "old.pt").memory.padding == 0
