"""The PatchCore-style memory banks: patch features, nearest-patch distances, coresets, fusion statistics and
checkpoint round trips, against brute-force references."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from aead.training.checkpoint import load_encoder_bank, save_encoder_bank
from aead.errors import CheckpointError
from aead.models.memory_bank import build_encoder_bank, coreset_size, greedy_coreset, select_coreset
from aead.models.scoring import SCALE_FLOOR, mean_and_peak_scale
from aead.models.backbones import build_backbone
from aead.models.torch_model import (PatchMemory, PretrainedPatchMemory, _candidate_rows, build_model,
                                     candidate_distance, nearest_distance, patch_features, principal_axes)


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


def test_pretrained_features_damp_the_outermost_patches_by_their_share_inside():
    """Without a mirrored border the 3 x 3 neighbourhood average counts the positions outside the image as zeros
    (PatchCore's pooling): a corner patch is 4/9 of the mean of its 2 x 2 inside, an edge patch 6/9 of its 2 x 3, an
    inner patch the plain mean. With a mirrored border the average sees mirrored positions instead, and nothing is
    damped."""
    backbone = build_backbone("efficientnet_lite0")
    x = to_batch(images(1, size=64))
    with torch.no_grad():
        plain = PretrainedPatchMemory(backbone, ("blocks.4",), 3, 0, 0, 0).features(x)
        level = backbone(x, ("blocks.4",))[0]
        mirrored = PretrainedPatchMemory(backbone, ("blocks.4",), 3, 0, 0, 16).features(x)
        padded = backbone(torch.nn.functional.pad(x, (16, 16, 16, 16), mode="reflect"), ("blocks.4",))[0]
    torch.testing.assert_close(plain[..., 0, 0], level[..., 0:2, 0:2].mean(dim=(2, 3)) * 4 / 9)
    torch.testing.assert_close(plain[..., 0, 3], level[..., 0:2, 2:5].mean(dim=(2, 3)) * 6 / 9)
    torch.testing.assert_close(plain[..., 3, 3], level[..., 2:5, 2:5].mean(dim=(2, 3)))
    torch.testing.assert_close(mirrored[..., 0, 0], padded[..., 1:4, 1:4].mean(dim=(2, 3)))


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


def test_build_encoder_bank_keeps_the_ratio_and_is_deterministic():
    encoder = build_model("baseline", 4, seed=0).encoder.eval()
    train = images(6)
    a, stats = build_encoder_bank(encoder, train, 8, 4, "greedy", 0.25, 1000, 5, torch.device("cpu"), log=lambda m: None)
    b, _ = build_encoder_bank(encoder, train, 8, 4, "greedy", 0.25, 1000, 5, torch.device("cpu"), log=lambda m: None)
    assert stats.patches == 6 * 64 and a.bank.shape == (96, 28) and stats.bank_size == 96
    assert torch.equal(a.bank, b.bank), "deterministic"
    capped, stats = build_encoder_bank(encoder, train, 8, 4, "random", 0.25, 50, 5, torch.device("cpu"),
                                       log=lambda m: None)
    assert capped.bank.shape == (50, 28) and stats.bank_size == 50, "max_bank_size bounds the bank"
    assert a.padding == 4 and a.feature_size == 8


def test_coreset_size_is_the_ratio_bounded_by_the_maximum():
    assert coreset_size(1000, 0.1, 16384) == 100
    assert coreset_size(1000, 0.1, 30) == 30
    assert coreset_size(5, 0.01, 10) == 1, "at least one patch"
    assert coreset_size(5, 1.0, 10) == 5


def test_random_coreset_is_seeded_sorted_and_without_repeats():
    points = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    a = select_coreset(points, "random", 0.2, 1000, seed=3)
    assert torch.equal(a, select_coreset(points, "random", 0.2, 1000, seed=3))
    assert not torch.equal(a, select_coreset(points, "random", 0.2, 1000, seed=4))
    assert len(a) == 40 and len(set(a.tolist())) == 40 and torch.equal(a, a.sort().values)
    with pytest.raises(ValueError, match="unknown coreset method"):
        select_coreset(points, "kmeans", 0.2, 1000, seed=3)


@pytest.mark.parametrize("query_chunk,bank_chunk", [(512, 65536), (7, 5), (1, 1)])
def test_nearest_distance_in_chunks_equals_brute_force(query_chunk, bank_chunk):
    gen = torch.Generator().manual_seed(1)
    queries, bank = torch.randn(37, 6, generator=gen), torch.randn(23, 6, generator=gen)
    brute = torch.cdist(queries.double(), bank.double()).min(dim=1).values.float()
    torch.testing.assert_close(nearest_distance(queries, bank, query_chunk, bank_chunk), brute, rtol=1e-5, atol=1e-5)


def clustered(n: int, dims: int, seed: int) -> torch.Tensor:
    """Points around 20 centres whose spread falls off over the dimensions, as patch features' variance does."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, dims, generator=torch.Generator().manual_seed(99)) * 3
    spread = 0.75 ** torch.arange(dims, dtype=torch.float32)
    return centres[torch.randint(20, (n,), generator=gen)] + torch.randn(n, dims, generator=gen) * spread


def test_principal_axes_are_orthonormal_ordered_and_sign_fixed():
    bank = clustered(600, 24, seed=0)
    mean, axes = principal_axes(bank, 8)
    assert axes.shape == (24, 8)
    torch.testing.assert_close(axes.T @ axes, torch.eye(8), atol=1e-5, rtol=0)
    variance = ((bank - mean) @ axes).var(0)
    assert torch.all(variance[:-1] >= variance[1:])
    assert torch.all(axes.gather(0, axes.abs().argmax(0, keepdim=True)) > 0)
    flipped_mean, flipped = principal_axes(bank[torch.randperm(600, generator=torch.Generator().manual_seed(1))], 8)
    torch.testing.assert_close(flipped, axes, atol=1e-4, rtol=0)


def test_candidate_distance_is_a_true_distance_and_finds_the_nearest_patch():
    bank, queries = clustered(3000, 32, seed=1), clustered(2000, 32, seed=2)
    mean, axes = principal_axes(bank, 8)
    projected = (bank - mean) @ axes
    exact = torch.cdist(queries.double(), bank.double()).min(dim=1).values.float()
    approx = candidate_distance(queries, bank, mean, axes, projected, candidates=16, query_chunk=300)
    assert torch.all(approx >= exact * (1 - 1e-5))  # never nearer than the nearest stored patch
    found = ((approx - exact).abs() <= 1e-5 * exact).float().mean().item()
    assert found > 0.95
    fewer = candidate_distance(queries, bank, mean, axes, projected, candidates=1)
    assert ((fewer - exact).abs() <= 1e-5 * exact).float().mean().item() < found
    every = candidate_distance(queries, bank, mean, axes, projected, candidates=5000)
    torch.testing.assert_close(every, exact, rtol=1e-5, atol=1e-6)


def test_candidate_search_in_bank_chunks_keeps_the_same_candidates():
    """The exported graph ranks the bank in chunks and keeps each chunk's best: the same distances as one pass."""
    bank, queries = clustered(1000, 16, seed=3), clustered(200, 16, seed=4)
    mean, axes = principal_axes(bank, 4)
    projected = (bank - mean) @ axes
    square = (projected * projected).sum(1)
    whole = _candidate_rows(queries, bank, mean, axes, projected, square, 8, 1000)
    for chunk in (999, 128, 7):
        assert torch.equal(_candidate_rows(queries, bank, mean, axes, projected, square, 8, chunk), whole)


def test_encoder_bank_round_trip(tmp_path):
    memory = PatchMemory(10, 28, 8, padding=4)
    memory.bank.copy_(torch.arange(280.0).reshape(10, 28))
    save_encoder_bank(tmp_path / "x.pt", memory, {"coreset_ratio": 0.5})
    loaded = load_encoder_bank(tmp_path / "x.pt")
    assert torch.equal(loaded.bank, memory.bank) and loaded.feature_size == 8 and loaded.padding == 4
    raw = torch.load(tmp_path / "x.pt", weights_only=True)
    assert raw["meta"] == {"coreset_ratio": 0.5, "bank_size": 10, "channels": 28, "feature_size": 8,
                           "border_padding": 4}
    raw["meta"]["bank_size"] = 11
    torch.save(raw, tmp_path / "y.pt")
    with pytest.raises(CheckpointError, match=r"y\.pt: memory bank does not fit its recorded shape"):
        load_encoder_bank(tmp_path / "y.pt")
    raw["kind"] = "segmentation_head"
    torch.save(raw, tmp_path / "z.pt")
    with pytest.raises(CheckpointError, match=r"z\.pt: holds a checkpoint of kind 'segmentation_head', expected 'encoder_bank'"):
        load_encoder_bank(tmp_path / "z.pt")
