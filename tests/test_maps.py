"""Tests for aead.models.maps against scipy.ndimage and scikit-image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity

from aead.models import maps as A
from aead.errors import DataError, ParamsError


def _pair(seed: int, smooth: bool, n: int = 3, channels: int = 1, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Two (N,C,H,W) float64 image stacks in [0, 1], the second a noisy copy of the first."""
    rng = np.random.default_rng(seed)
    a = rng.random((n, channels, size, size))
    if smooth:
        a = ndimage.gaussian_filter(a, (0, 0, 3, 3))
        a = (a - a.min()) / (a.max() - a.min())
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    return a, b


def _skimage_ssim(a: np.ndarray, b: np.ndarray, channel_axis: int | None = None) -> tuple[float, np.ndarray]:
    return structural_similarity(
        a,
        b,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=1.0,
        full=True,
        channel_axis=channel_axis,
    )


# --------------------------------------------------------------------------- blurring


def test_gaussian_kernel1d() -> None:
    k = A.gaussian_kernel1d(2.0)
    assert k.numel() == 2 * int(4.0 * 2.0 + 0.5) + 1
    assert float(k.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(k, k.flip(0))
    assert A.gaussian_kernel1d(1.5, truncate=3.5).numel() == 11
    assert A.gaussian_kernel1d(0.0).tolist() == [1.0]


@pytest.mark.parametrize("mode", ["reflect", "mirror", "nearest"])
@pytest.mark.parametrize("sigma", [0.7, 2.0, 6.0, 40.0])
def test_gaussian_blur_matches_scipy_full_image(mode: str, sigma: float) -> None:
    x = np.random.default_rng(0).random((2, 3, 20, 27))
    got = A.gaussian_blur(torch.from_numpy(x), sigma, mode=mode).numpy()
    expected = ndimage.gaussian_filter(x, (0, 0, sigma, sigma), mode=mode)
    np.testing.assert_allclose(got, expected, atol=1e-12)


@pytest.mark.parametrize("mode", ["reflect", "mirror", "nearest"])
def test_gaussian_blur_convolution_path_for_large_axes_matches_scipy(mode: str) -> None:
    """Axes longer than MATMUL_BLUR_MAX take the convolution path; both paths give scipy's result."""
    x = np.random.default_rng(1).random((1, 2, 9, A.MATMUL_BLUR_MAX + 37))
    got = A.gaussian_blur(torch.from_numpy(x), 3.0, mode=mode).numpy()
    np.testing.assert_allclose(got, ndimage.gaussian_filter(x, (0, 0, 3.0, 3.0), mode=mode), atol=1e-12)


def test_blur_matrix_rows_sum_to_one_and_blur_a_vector_like_scipy() -> None:
    m = A.blur_matrix(13, 2.0, dtype=torch.float64)
    np.testing.assert_allclose(m.sum(dim=1).numpy(), np.ones(13), atol=1e-12)
    v = np.random.default_rng(2).random(13)
    np.testing.assert_allclose((m @ torch.from_numpy(v)).numpy(), ndimage.gaussian_filter1d(v, 2.0), atol=1e-12)
    with pytest.raises(ParamsError):
        A.blur_matrix(13, 2.0, mode="wrap")


def test_gaussian_blur_shapes_dtype_and_identity() -> None:
    x = torch.rand(2, 16, 16)
    out = A.gaussian_blur(x, 1.0)
    assert out.shape == x.shape and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ndimage.gaussian_filter(x.numpy(), (0, 1, 1)), atol=1e-6)
    assert A.gaussian_blur(x, 0.0) is x
    assert A.gaussian_blur(x, -1.0) is x
    with pytest.raises(ParamsError):
        A.gaussian_blur(x, 1.0, mode="wrap")
    with pytest.raises(DataError):
        A.gaussian_blur(torch.ones(2, 4, 4, dtype=torch.int64), 1.0)


# ------------------------------------------------------------------------------- SSIM


@pytest.mark.parametrize("smooth", [False, True])
def test_ssim_map_matches_skimage(smooth: bool) -> None:
    a, b = _pair(1, smooth)
    r = A.ssim_window_radius(1.5)
    assert r == 5
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        got = A.ssim_map(torch.tensor(a, dtype=dtype), torch.tensor(b, dtype=dtype)).double().numpy()
        means = A.ssim(torch.tensor(a, dtype=dtype), torch.tensor(b, dtype=dtype)).double().numpy()
        assert got.shape == (3, 64, 64)
        for i in range(3):
            mssim, full = _skimage_ssim(a[i, 0], b[i, 0])
            np.testing.assert_allclose(got[i, r:-r, r:-r], full[r:-r, r:-r], atol=tol)
            np.testing.assert_allclose(got[i], full, atol=tol)  # borders too (same 'reflect')
            assert got[i, r:-r, r:-r].mean() == pytest.approx(mssim, abs=tol)
            assert means[i] == pytest.approx(mssim, abs=tol)


def test_ssim_map_color_averages_channels() -> None:
    a, b = _pair(2, smooth=True, n=2, channels=3, size=32)
    got = A.ssim_map(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    means = A.ssim(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    for i in range(2):
        mssim, full = _skimage_ssim(a[i], b[i], channel_axis=0)
        np.testing.assert_allclose(got[i], full.mean(axis=0), atol=1e-10)
        assert means[i] == pytest.approx(mssim, abs=1e-10)


def test_identical_images_give_ssim_one_and_zero_error() -> None:
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(A.ssim_map(x, x), torch.ones(2, 32, 32))
    torch.testing.assert_close(A.ssim_error_map(x, x, 1.5, 4.0), torch.zeros(2, 32, 32), atol=1e-6, rtol=0)
    torch.testing.assert_close(A.l1_map(x, x), torch.zeros(2, 32, 32))


def test_ssim_is_differentiable_and_checks_shapes() -> None:
    x = torch.rand(1, 1, 16, 16)
    y = torch.rand(1, 1, 16, 16, requires_grad=True)
    A.ssim(x, y).sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all()
    with pytest.raises(DataError):
        A.ssim_map(x, torch.rand(1, 1, 16, 15))
    with pytest.raises(DataError):
        A.ssim(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))  # smaller than the cropped window


# ------------------------------------------------------------------- error maps, gray


def test_rgb_to_gray_matches_skimage_and_passes_gray_through() -> None:
    x = torch.rand(2, 3, 8, 9, dtype=torch.float64)
    got = A.rgb_to_gray(x)
    assert got.shape == (2, 1, 8, 9)
    expected = rgb2gray(x.permute(0, 2, 3, 1).numpy())
    np.testing.assert_allclose(got[:, 0].numpy(), expected, atol=1e-12)
    g = torch.rand(2, 1, 8, 9)
    assert A.rgb_to_gray(g) is g
    with pytest.raises(DataError):
        A.rgb_to_gray(torch.rand(2, 2, 8, 9))


def test_l1_map_hand_made() -> None:
    x = torch.zeros(1, 3, 2, 2)
    r = torch.zeros(1, 3, 2, 2)
    r[0, :, 0, 0] = torch.tensor([0.3, -0.6, 0.9])
    got = A.l1_map(x, r)
    assert got.shape == (1, 2, 2)
    assert float(got[0, 0, 0]) == pytest.approx(0.6)
    assert float(got[0].sum()) == pytest.approx(0.6)


def test_ssim_error_map_is_smoothed_one_minus_gray_ssim() -> None:
    a, b = _pair(3, smooth=True, n=2, channels=3, size=32)
    x, y = torch.from_numpy(a), torch.from_numpy(b)
    raw = 1.0 - A.ssim_map(A.rgb_to_gray(x), A.rgb_to_gray(y))
    torch.testing.assert_close(A.ssim_error_map(x, y, 1.5, 0.0), raw)
    smoothed = A.ssim_error_map(x, y, window_sigma=1.5, smooth_sigma=2.0).numpy()
    np.testing.assert_allclose(smoothed, ndimage.gaussian_filter(raw.numpy(), (0, 2, 2)), atol=1e-12)
    assert smoothed.shape == (2, 32, 32) and smoothed.min() >= 0.0


# ---------------------------------------------------------------------- image scores


def test_image_scores_hand_made() -> None:
    maps = torch.zeros(2, 10, 10)
    maps[0, 0, :5] = 1.0  # 5 hot pixels
    maps[1, 4, 4] = 2.0  # one very hot pixel
    out = A.image_scores(maps, smooth_sigma=0.0, top_fraction=0.05)
    assert set(out) == {"mean", "top1", "max"}
    torch.testing.assert_close(out["mean"], torch.tensor([0.05, 0.02]))
    torch.testing.assert_close(out["top1"], torch.tensor([1.0, 0.4]))  # top 5 pixels of 100
    torch.testing.assert_close(out["max"], torch.tensor([1.0, 2.0]))
    # Default 1 %: top1 of a 10x10 map is its single highest pixel.
    torch.testing.assert_close(A.image_scores(maps, 0.0)["top1"], torch.tensor([1.0, 2.0]))


def test_image_scores_max_is_of_smoothed_map() -> None:
    maps = torch.rand(3, 1, 24, 24, dtype=torch.float64)  # (N,1,H,W) accepted
    out = A.image_scores(maps, smooth_sigma=2.0)
    expected = ndimage.gaussian_filter(maps[:, 0].numpy(), (0, 2, 2)).max(axis=(1, 2))
    np.testing.assert_allclose(out["max"].numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(out["mean"].numpy(), maps.numpy().mean(axis=(1, 2, 3)))
    k = int(np.ceil(0.01 * 24 * 24))
    top = np.sort(maps[:, 0].reshape(3, -1).numpy(), axis=1)[:, -k:].mean(axis=1)
    np.testing.assert_allclose(out["top1"].numpy(), top)
    with pytest.raises(ParamsError):
        A.image_scores(maps, 1.0, top_fraction=0.0)
