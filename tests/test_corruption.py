"""Tests for aead.data.corruption: synthetic anomalies for denoising training."""

from __future__ import annotations

import pytest
import torch

from aead.data.corruption import MODES, corrupt_batch, perlin_noise
from aead.errors import ParamsError

CORRUPTING = ("perlin", "cutpaste", "erase", "mixed")


def _images(n: int = 6, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth-ish random colour images in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand((n, 3, size // 8, size // 8), generator=g)
    smooth = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    fine = torch.rand((n, 3, size, size), generator=g)
    return (0.8 * smooth + 0.2 * fine).clamp(0, 1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_modes_tuple() -> None:
    assert MODES == ("none", "perlin", "cutpaste", "erase", "mixed")


@pytest.mark.parametrize("mode", MODES)
def test_shapes_dtypes_range(mode: str) -> None:
    x = _images()
    before = x.clone()
    out, mask = corrupt_batch(x, mode, _gen(), probability=1.0)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert mask.shape == (x.shape[0], 1, x.shape[2], x.shape[3])
    assert mask.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    assert torch.equal(x, before), "input must not be modified in place"


def test_none_is_identity() -> None:
    x = _images()
    out, mask = corrupt_batch(x, "none", _gen(), probability=1.0)
    assert torch.equal(out, x)
    assert not mask.any()


@pytest.mark.parametrize("mode", CORRUPTING)
def test_probability_zero_leaves_images_unchanged(mode: str) -> None:
    x = _images()
    out, mask = corrupt_batch(x, mode, _gen(), probability=0.0)
    assert torch.equal(out, x)
    assert not mask.any()


@pytest.mark.parametrize("mode", CORRUPTING)
def test_probability_one_corrupts_every_image(mode: str) -> None:
    x = _images(n=8)
    for seed in range(3):
        out, mask = corrupt_batch(x, mode, _gen(seed), probability=1.0)
        assert (mask.flatten(1).sum(1) > 0).all()
        # outside the mask nothing changes; inside the image changes
        diff = (out - x).abs()
        outside = diff * (mask == 0)
        assert outside.max() < 1e-6
        inside_mean = (diff * mask).sum((1, 2, 3)) / (3 * mask.sum((1, 2, 3)))
        assert (inside_mean > 0).all()


def test_partial_probability_mixes_clean_and_corrupted() -> None:
    x = _images(n=64, size=32)
    out, mask = corrupt_batch(x, "perlin", _gen(), probability=0.5)
    hit = mask.flatten(1).sum(1) > 0
    assert 10 < int(hit.sum()) < 54
    assert torch.equal(out[~hit], x[~hit])


def test_mask_area_is_plausible() -> None:
    x = _images(n=32, size=64)
    _, mask = corrupt_batch(x, "perlin", _gen(), probability=1.0)
    frac = mask.mean((1, 2, 3))
    assert frac.min() >= 0.001 and frac.max() <= 0.3
    assert frac.std() > 0.005  # random sizes, not all the same


@pytest.mark.parametrize("mode", CORRUPTING)
def test_deterministic_given_seed(mode: str) -> None:
    x = _images()
    a = corrupt_batch(x, mode, _gen(123), probability=0.75)
    b = corrupt_batch(x, mode, _gen(123), probability=0.75)
    c = corrupt_batch(x, mode, _gen(124), probability=0.75)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("mode", CORRUPTING)
def test_grayscale_stays_grayscale(mode: str) -> None:
    gray = _images(n=8)[:, :1].expand(-1, 3, -1, -1).contiguous()
    for seed in range(3):
        out, mask = corrupt_batch(gray, mode, _gen(seed), probability=1.0)
        assert mask.any()
        assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


def test_mixed_batch_of_colour_and_gray() -> None:
    x = _images(n=8)
    x[:4] = x[:4, :1].expand(-1, 3, -1, -1)
    out, _ = corrupt_batch(x, "perlin", _gen(), probability=1.0)
    assert torch.equal(out[:4, 0], out[:4, 1]) and torch.equal(out[:4, 1], out[:4, 2])


def test_single_image_batch() -> None:
    x = _images(n=1)
    for mode in CORRUPTING:
        out, mask = corrupt_batch(x, mode, _gen(), probability=1.0)
        assert mask.any() and not torch.equal(out, x)


def test_non_square_and_half_precision() -> None:
    x = _images(n=4, size=64)[:, :, :, :48].to(torch.float16)
    out, mask = corrupt_batch(x, "mixed", _gen(), probability=1.0)
    assert out.dtype == torch.float16 and out.shape == x.shape
    assert mask.shape == (4, 1, 64, 48)


def test_perlin_noise_smooth_and_centred() -> None:
    noise = perlin_noise((128, 128), (8, 8), _gen(), "cpu")
    assert noise.shape == (128, 128) and noise.dtype == torch.float32
    spread = float(noise.max() - noise.min())
    assert 0.8 < spread <= 2.0
    assert noise.abs().max() <= 1.0 + 1e-5
    step_y = (noise[1:] - noise[:-1]).abs().max()
    step_x = (noise[:, 1:] - noise[:, :-1]).abs().max()
    assert max(step_y, step_x) < 0.15 * spread  # 16 px per cell: at most ~1/10 of the range per pixel
    assert float((noise[:, 1:] - noise[:, :-1]).abs().mean()) < 0.05 * spread
    means = [perlin_noise((64, 64), (8, 8), _gen(s)).mean() for s in range(10)]
    assert abs(float(torch.stack(means).mean())) < 0.05


def test_perlin_noise_deterministic_and_non_square() -> None:
    a = perlin_noise((40, 70), (3, 5), _gen(7))
    b = perlin_noise((40, 70), (3, 5), _gen(7))
    assert a.shape == (40, 70) and torch.equal(a, b)
    assert not torch.equal(a, perlin_noise((40, 70), (3, 5), _gen(8)))


def test_bad_mode_raises() -> None:
    with pytest.raises(ParamsError, match="model.corruption"):
        corrupt_batch(_images(), "gaussian", _gen())


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), "0.5", True])
def test_bad_probability_raises(p: object) -> None:
    with pytest.raises(ParamsError, match="model.corruption_probability"):
        corrupt_batch(_images(), "perlin", _gen(), probability=p)  # type: ignore[arg-type]


def test_bad_shape_raises() -> None:
    with pytest.raises(ValueError):
        corrupt_batch(torch.rand(2, 1, 16, 16), "perlin", _gen())
