"""Anomaly maps in torch: Gaussian blur, SSIM, per-pixel errors and image scores.

Everything is batched over images, runs on whatever device and float dtype the
input tensors have, and stays differentiable (so SSIM can also serve as a loss).
Border handling uses scipy.ndimage mode names; the default ``'reflect'`` is
scipy's half-sample symmetric extension ``(d c b a | a b c d)``, which is what
scikit-image's SSIM uses. (torch's own ``'reflect'`` padding is scipy's ``'mirror'``.)
"""

from __future__ import annotations

from fractions import Fraction

import torch
import torch.nn.functional as F

from aead.errors import DataError, ParamsError

__all__ = [
    "gaussian_kernel1d",
    "blur_matrix",
    "blur_by_convolution",
    "gaussian_blur",
    "ssim_window_radius",
    "ssim_map",
    "ssim",
    "rgb_to_gray",
    "l1_map",
    "ssim_error_map",
    "image_scores",
]

_PAD_MODES = ("reflect", "mirror", "nearest")

# scikit-image's rgb2gray weights (ITU-R BT.709 luma), not the BT.601 0.299/0.587/0.114.
_GRAY_WEIGHTS = (0.2125, 0.7154, 0.0721)


def gaussian_kernel1d(
    sigma: float,
    truncate: float = 4.0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius ``int(truncate * sigma + 0.5)`` (as scipy.ndimage).

    ``sigma <= 0`` gives the identity kernel ``[1.0]``.
    """
    if sigma <= 0:
        return torch.ones(1, dtype=dtype, device=device)
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def _pad_index(n: int, pad: int, mode: str, device: torch.device) -> torch.Tensor:
    """Source indices for a length-``n`` axis extended by ``pad`` on both sides (any ``pad``)."""
    i = torch.arange(-pad, n + pad, device=device)
    if mode == "nearest" or (isinstance(n, int) and n == 1):
        return i.clamp(0, n - 1)
    size = torch.full((), n, dtype=torch.int64, device=device)  # a tensor, so an exported graph's symbolic n works too
    if mode == "reflect":  # d c b a | a b c d | d c b a
        j = i.remainder(2 * size)
        return torch.where(j >= size, 2 * size - 1 - j, j)
    if mode == "mirror":  # d c b | a b c d | c b a
        period = 2 * size - 2
        j = i.remainder(period)
        return torch.where(j >= size, period - j, j)
    raise ParamsError(f"unknown padding mode {mode!r}; use one of {_PAD_MODES}")


def _check_float(x: torch.Tensor, name: str, min_dim: int) -> None:
    """Raise DataError unless ``x`` is a floating tensor with at least ``min_dim`` dims."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise DataError(f"{name} must be a floating-point torch tensor")
    if x.dim() < min_dim:
        raise DataError(f"{name} must have at least {min_dim} dimensions, got shape {tuple(x.shape)}")


# Up to this many pixels along an axis, blurring multiplies by a dense (n, n) matrix (padding folded in):
# one BLAS call per axis, about 6x faster than single-channel convolutions at 256 px on a CPU. Beyond it,
# the O(n^2) matrix costs more than the O(n * taps) convolution.
MATMUL_BLUR_MAX = 512


def blur_matrix(n: int, sigma: float, truncate: float = 4.0, mode: str = "reflect", *,
                dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """(n, n) matrix ``M`` such that ``M @ v`` is the 1-D Gaussian blur of a length-``n`` vector ``v``
    with scipy-style border ``mode`` (the padded samples are folded back onto the rows they copy)."""
    if mode not in _PAD_MODES:
        raise ParamsError(f"unknown padding mode {mode!r}; use one of {_PAD_MODES}")
    k = gaussian_kernel1d(sigma, truncate, dtype=torch.float64)
    taps = k.numel()
    r = (taps - 1) // 2
    src = _pad_index(n, r, mode, torch.device("cpu"))
    rows = torch.arange(n).repeat_interleave(taps)
    cols = src.unfold(0, taps, 1).reshape(-1)
    m = torch.zeros(n, n, dtype=torch.float64)
    m.index_put_((rows, cols), k.repeat(n), accumulate=True)
    return m.to(dtype=dtype, device=device)


def _blur_conv(x: torch.Tensor, k: torch.Tensor, mode: str) -> torch.Tensor:
    """Separable blur of (P, 1, H, W) planes by explicit padding and two 1-D convolutions."""
    r = (k.numel() - 1) // 2
    h, w = x.shape[-2:]
    x = F.conv2d(x.index_select(2, _pad_index(h, r, mode, x.device)), k.view(1, 1, -1, 1))
    return F.conv2d(x.index_select(3, _pad_index(w, r, mode, x.device)), k.view(1, 1, 1, -1))


def blur_by_convolution(x: torch.Tensor, sigma: float, truncate: float = 4.0, mode: str = "reflect") -> torch.Tensor:
    """:func:`gaussian_blur` of the last two axes of ``x`` by 1-D convolutions at every size (its path for large and
    symbolic sizes), so that a graph exported with symbolic sizes rounds as the eager module does."""
    k = gaussian_kernel1d(sigma, truncate, dtype=x.dtype, device=x.device)
    h, w = x.shape[-2], x.shape[-1]
    return _blur_conv(x.reshape(-1, 1, h, w), k, mode).reshape(x.shape)


def gaussian_blur(x: torch.Tensor, sigma: float, truncate: float = 4.0, mode: str = "reflect") -> torch.Tensor:
    """Gaussian-blur the last two axes of ``x`` (e.g. (N,C,H,W) or (N,H,W)), same shape out.

    Separable, each plane on its own; matches
    ``scipy.ndimage.gaussian_filter(x, sigma, mode=mode, truncate=truncate)``
    applied per plane. ``mode`` is 'reflect' (default), 'mirror' or 'nearest'
    in scipy's sense. ``sigma <= 0`` returns ``x`` unchanged. Axes up to ``MATMUL_BLUR_MAX`` pixels
    are blurred as ``M_h @ x @ M_w^T`` (see ``blur_matrix``), larger ones, and symbolic sizes (an exported graph
    whose map size follows its input's), by 1-D convolutions.
    """
    _check_float(x, "x", 2)
    if sigma <= 0:
        return x
    if mode not in _PAD_MODES:
        raise ParamsError(f"unknown padding mode {mode!r}; use one of {_PAD_MODES}")
    h, w = x.shape[-2], x.shape[-1]
    if isinstance(h, int) and isinstance(w, int) and max(h, w) <= MATMUL_BLUR_MAX:
        mh = blur_matrix(h, sigma, truncate, mode, dtype=x.dtype, device=x.device)
        mw = mh if w == h else blur_matrix(w, sigma, truncate, mode, dtype=x.dtype, device=x.device)
        return torch.matmul(torch.matmul(mh, x), mw.T)
    return blur_by_convolution(x, sigma, truncate, mode)


def ssim_window_radius(window_sigma: float = 1.5, truncate: float = 3.5) -> int:
    """Radius of the Gaussian SSIM window; skimage crops this many border pixels for its mean."""
    return int(truncate * window_sigma + 0.5)


def ssim_map(
    x: torch.Tensor,
    y: torch.Tensor,
    window_sigma: float = 1.5,
    data_range: float = 1.0,
    K1: float = 0.01,
    K2: float = 0.03,
    truncate: float = 3.5,
) -> torch.Tensor:
    """Per-pixel SSIM of (N,C,H,W) images with a Gaussian window, averaged over channels: (N,H,W).

    Same definition as ``skimage.metrics.structural_similarity(gaussian_weights=True,
    sigma=window_sigma, use_sample_covariance=False, full=True)`` (window truncated at
    3.5 sigma, scipy-'reflect' borders), so the full map matches skimage's everywhere.
    """
    _check_float(x, "x", 4)
    if x.dim() != 4 or x.shape != y.shape:
        raise DataError(f"x and y must both be (N, C, H, W); got {tuple(x.shape)} and {tuple(y.shape)}")
    if window_sigma <= 0:
        raise ParamsError(f"window_sigma must be positive, got {window_sigma}")
    y = y.to(dtype=x.dtype, device=x.device)
    c1 = (K1 * data_range) ** 2
    c2 = (K2 * data_range) ** 2
    # One batched blur of all five local moments.
    moments = gaussian_blur(torch.cat([x, y, x * x, y * y, x * y], dim=1), window_sigma, truncate, "reflect")
    ux, uy, uxx, uyy, uxy = moments.chunk(5, dim=1)
    vx = uxx - ux * ux
    vy = uyy - uy * uy
    vxy = uxy - ux * uy
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=1)


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    window_sigma: float = 1.5,
    data_range: float = 1.0,
    K1: float = 0.01,
    K2: float = 0.03,
) -> torch.Tensor:
    """Mean SSIM per image, (N,), cropping the window radius from the border as skimage does."""
    s = ssim_map(x, y, window_sigma, data_range, K1, K2)
    r = ssim_window_radius(window_sigma)
    h, w = s.shape[-2:]
    if 2 * r >= h or 2 * r >= w:
        raise DataError(f"images of {h}x{w} are too small for an SSIM window of radius {r}")
    return s[:, r : h - r, r : w - r].mean(dim=(-2, -1))


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """(N,3,H,W) RGB to (N,1,H,W) luminance with skimage's ``rgb2gray`` weights
    (0.2125, 0.7154, 0.0721); (N,1,H,W) input is returned unchanged."""
    _check_float(x, "x", 4)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise DataError(f"expected (N, 1, H, W) or (N, 3, H, W) images, got shape {tuple(x.shape)}")
    if x.shape[1] == 1:
        return x
    w = torch.tensor(_GRAY_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def l1_map(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over channels per pixel: (N,C,H,W) pair -> (N,H,W)."""
    _check_float(x, "x", 4)
    if x.dim() != 4 or x.shape != recon.shape:
        raise DataError(f"x and recon must both be (N, C, H, W); got {tuple(x.shape)} and {tuple(recon.shape)}")
    return (x - recon).abs().mean(dim=1)


def ssim_error_map(
    x: torch.Tensor,
    recon: torch.Tensor,
    window_sigma: float = 1.5,
    smooth_sigma: float = 4.0,
    data_range: float = 1.0,
) -> torch.Tensor:
    """``1 - SSIM`` of the grayscale images, then Gaussian-smoothed: (N,H,W).

    Values lie in [0, 2] (SSIM can be negative) and are not clipped;
    ``smooth_sigma <= 0`` skips the smoothing.
    """
    err = 1.0 - ssim_map(rgb_to_gray(x), rgb_to_gray(recon), window_sigma, data_range)
    return gaussian_blur(err, smooth_sigma)


def image_scores(
    error_map: torch.Tensor, smooth_sigma: float = 4.0, top_fraction: float = 0.01
) -> dict[str, torch.Tensor]:
    """Per-image anomaly scores from (N,H,W) (or (N,1,H,W)) error maps, each of shape (N,).

    ``mean``: mean of the map; ``top1``: mean of the ``ceil(top_fraction * H * W)``
    highest pixels (1 % by default; at least one pixel); ``max``: maximum of the
    map after Gaussian smoothing with ``smooth_sigma`` (none if ``<= 0``).
    """
    _check_float(error_map, "error_map", 3)
    if error_map.dim() == 4 and error_map.shape[1] == 1:
        error_map = error_map[:, 0]
    if error_map.dim() != 3:
        raise DataError(f"error_map must be (N, H, W) or (N, 1, H, W), got shape {tuple(error_map.shape)}")
    if not 0.0 < top_fraction <= 1.0:
        raise ParamsError(f"top_fraction must be in (0, 1], got {top_fraction}")
    flat = error_map.flatten(1)
    fraction = Fraction(top_fraction).limit_denominator(1_000_000)
    # ceil in integers of positive numbers: exact, and exportable (ONNX divides integers toward zero, not down)
    k = (flat.shape[1] * fraction.numerator + fraction.denominator - 1) // fraction.denominator
    if isinstance(k, int):  # a symbolic size (an exported graph) has k between 1 and its pixels already
        k = min(flat.shape[1], max(1, k))
    return {
        "mean": flat.mean(dim=1),
        "top1": flat.topk(k, dim=1).values.mean(dim=1),
        "max": gaussian_blur(error_map, smooth_sigma).flatten(1).amax(dim=1),
    }
