"""Synthetic anomalies for denoising-style autoencoder training.

The autoencoders are trained on defect-free images only.  To stop a model with
skip connections from learning the identity, the training input is corrupted
with synthetic anomalies and the model is asked to reconstruct the *clean*
image (as in DRAEM, RIAD or denoising autoencoders).  This module makes those
corruptions, batched in torch and deterministic given a ``torch.Generator``.

Modes (``MODES``):

* ``none``: no corruption.
* ``perlin``: DRAEM-style; Perlin-noise blobs filled with a foreign texture
  (another image of the batch, the image itself shifted, or a procedural
  coloured noise) blended with a random opacity.
* ``cutpaste``: a rectangle (or a thin rotated "scar") cut from the image and
  pasted elsewhere, optionally colour-jittered.
* ``erase``: one to three rectangles filled with a constant colour or noise.
* ``mixed``: per image one of the above (perlin 50 %, cutpaste 25 %, erase 25 %).

All random numbers are drawn from the given generator on the generator's own
device and then moved to the batch's device, so a CPU generator works with a
CUDA batch.  Grayscale images (three equal channels) stay grayscale.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

from aead.errors import ParamsError

__all__ = ["MODES", "corrupt_batch", "perlin_noise"]

MODES: tuple[str, ...] = ("none", "perlin", "cutpaste", "erase", "mixed")

_KEY = "model.corruption"
_PROB_KEY = "model.corruption_probability"

# perlin mode
_PERLIN_CELL_EXP = (1, 4)  # cells along H = 2**k, k uniform in this range (inclusive)
_PERLIN_ANISOTROPY = 1  # cells along W = 2**(k + d), |d| <= this (clipped to the range)
_PERLIN_AREA = (0.005, 0.15)  # fraction of the image, log-uniform
_PERLIN_OPACITY = (0.3, 1.0)
_PERLIN_FOCUS_PROB = 0.85  # probability to pull the blobs towards one random spot
_TEX_CELL_EXP = (2, 5)  # procedural texture: cells 2**k plus an octave at 2**(k+1)
# cutpaste mode
_CP_AREA = (0.01, 0.10)
_ASPECT = (0.3, 3.3)
_SCAR_PROB = 0.35
_SCAR_WIDTH = (2.0, 16.0)  # pixels at 256 px
_SCAR_LENGTH = (10.0, 60.0)  # pixels at 256 px
_CP_JITTER_PROB = 0.5
# erase mode
_ERASE_AREA = (0.005, 0.05)
_ERASE_MAX_RECTS = 3
_ERASE_NOISE_PROB = 0.5
# mixed mode: probabilities of perlin, cutpaste, erase
_MIXED_PROBS = (0.5, 0.25, 0.25)

_LUMA = (0.299, 0.587, 0.114)
_GRAY_TOL = 1e-6


# --------------------------------------------------------------------------- random helpers


def _rand(gen: torch.Generator, shape: tuple[int, ...], device: torch.device | str) -> Tensor:
    """Uniform [0, 1) float32 drawn on the generator's device, moved to ``device``."""
    return torch.rand(shape, generator=gen, device=gen.device).to(device)


def _uniform(
    gen: torch.Generator,
    lo: float,
    hi: float,
    shape: tuple[int, ...],
    device: torch.device | str,
) -> Tensor:
    """Uniform [lo, hi) float32."""
    return lo + (hi - lo) * _rand(gen, shape, device)


def _log_uniform(
    gen: torch.Generator,
    lo: float,
    hi: float,
    shape: tuple[int, ...],
    device: torch.device | str,
) -> Tensor:
    """Log-uniform in [lo, hi)."""
    return torch.exp(_uniform(gen, math.log(lo), math.log(hi), shape, device))


def _randint(
    gen: torch.Generator,
    lo: int,
    hi: int,
    shape: tuple[int, ...],
    device: torch.device | str,
) -> Tensor:
    """Integers uniform in [lo, hi] (inclusive), int64."""
    return torch.randint(lo, hi + 1, shape, generator=gen, device=gen.device).to(device)


# --------------------------------------------------------------------------- perlin noise


def _fade(t: Tensor) -> Tensor:
    """Perlin's quintic fade curve 6t^5 - 15t^4 + 10t^3."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def _perlin_batch(
    cells_y: Tensor,
    cells_x: Tensor,
    height: int,
    width: int,
    gen: torch.Generator,
    device: torch.device | str,
    random_phase: bool = True,
) -> Tensor:
    """Gradient noise for a batch, (n, height, width), roughly in [-1, 1].

    Image ``i`` spans ``cells_y[i]`` x ``cells_x[i]`` lattice cells; with
    ``random_phase`` the lattice is shifted by a random sub-cell offset.
    """
    n = int(cells_y.shape[0])
    cy = cells_y.to(device=device, dtype=torch.float32)
    cx = cells_x.to(device=device, dtype=torch.float32)
    grid_h = int(cells_y.max()) + 2
    grid_w = int(cells_x.max()) + 2
    angles = _rand(gen, (n, grid_h * grid_w), device) * (2.0 * math.pi)
    grad_y = torch.sin(angles)
    grad_x = torch.cos(angles)
    if random_phase:
        phase = _rand(gen, (n, 2), device)
    else:
        phase = torch.zeros((n, 2), device=device)

    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    ys = ys[None, :] * cy[:, None] + phase[:, :1]  # (n, h) lattice coordinates
    xs = xs[None, :] * cx[:, None] + phase[:, 1:]  # (n, w)
    y0 = ys.floor()
    x0 = xs.floor()
    fy = ys - y0
    fx = xs - x0
    u = _fade(fx)
    v = _fade(fy)
    # The corner dot product g . (fx - dc, fy - dr) splits into an x part and a y part,
    # so interpolating along x can be done per lattice row on the small (n, grid_h, w)
    # arrays:  row value = P[r](x) + (fy - dr) * Q[r](x).
    grad_x = grad_x.view(n, grid_h, grid_w)
    grad_y = grad_y.view(n, grid_h, grid_w)
    col0 = x0.long()[:, None, :].expand(n, grid_h, width)
    gx0 = torch.gather(grad_x, 2, col0)
    gx1 = torch.gather(grad_x, 2, col0 + 1)
    gy0 = torch.gather(grad_y, 2, col0)
    gy1 = torch.gather(grad_y, 2, col0 + 1)
    fx_b = fx[:, None, :]
    u_b = u[:, None, :]
    p_rows = torch.lerp(gx0 * fx_b, gx1 * (fx_b - 1.0), u_b)  # (n, grid_h, w)
    q_rows = torch.lerp(gy0, gy1, u_b)
    pq = torch.stack((p_rows, q_rows), dim=-1)  # (n, grid_h, w, 2)
    batch = torch.arange(n, device=device)[:, None]
    row0 = y0.long()
    top_pq = pq[batch, row0]  # (n, h, w, 2)
    bottom_pq = pq[batch, row0 + 1]
    fy_b = fy[:, :, None]
    top = top_pq[..., 0] + fy_b * top_pq[..., 1]
    bottom = bottom_pq[..., 0] + (fy_b - 1.0) * bottom_pq[..., 1]
    return torch.lerp(top, bottom, v[:, :, None]).mul_(math.sqrt(2.0))


def perlin_noise(
    shape: tuple[int, int],
    scale: tuple[int, int],
    generator: torch.Generator,
    device: torch.device | str | None = None,
) -> Tensor:
    """2-D Perlin (gradient) noise of ``shape`` (H, W), roughly in [-1, 1].

    ``scale`` = (cells along H, cells along W), each >= 1: the number of
    lattice cells the image spans (larger = finer structure).
    """
    height, width = (int(s) for s in shape)
    sy, sx = (int(s) for s in scale)
    if height < 1 or width < 1 or sy < 1 or sx < 1:
        raise ValueError(f"perlin_noise: shape and scale must be positive, got shape={shape}, scale={scale}")
    dev = torch.device(device) if device is not None else generator.device
    cells = torch.tensor([[sy, sx]], dtype=torch.long)
    return _perlin_batch(cells[:, 0], cells[:, 1], height, width, generator, dev, random_phase=False)[0]


# --------------------------------------------------------------------------- colour helpers


def _gray_flags(images: Tensor) -> Tensor:
    """(n,) bool: True where the three channels are equal (grayscale image)."""
    spread = images.amax(dim=1) - images.amin(dim=1)
    return spread.flatten(1).amax(dim=1) <= _GRAY_TOL


def _match_gray(texture: Tensor, is_gray: Tensor) -> Tensor:
    """Replace the texture of grayscale images by its channel mean (exactly equal channels)."""
    if not bool(is_gray.any()):
        return texture
    gray = texture.mean(dim=1, keepdim=True).expand_as(texture)
    return torch.where(is_gray[:, None, None, None], gray, texture)


def _colour_transform(
    images: Tensor,
    brightness: Tensor,
    contrast: Tensor,
    saturation: Tensor,
    gains: Tensor,
) -> Tensor:
    """Per-image colour jitter as one affine map per pixel, clamped to [0, 1].

    brightness, contrast, saturation: (n,); gains: (n, 3) per-channel factors.
    """
    n = images.shape[0]
    device = images.device
    luma = torch.tensor(_LUMA, device=device, dtype=images.dtype)
    eye = torch.eye(3, device=device, dtype=images.dtype)
    gray_proj = luma[None, :].expand(3, 3)
    s = saturation.to(images.dtype)[:, None, None]
    sat = s * eye + (1.0 - s) * gray_proj  # (n, 3, 3)
    b = brightness.to(images.dtype)[:, None, None]
    c = contrast.to(images.dtype)[:, None, None]
    g = gains.to(images.dtype)
    matrix = g[:, :, None] * (b * c * sat)
    mean_luma = torch.einsum("c,nc->n", luma, images.mean(dim=(2, 3)))
    offset = g * (brightness * (1.0 - contrast) * mean_luma)[:, None]  # (n, 3)
    out = torch.baddbmm(offset[:, :, None], matrix, images.reshape(n, 3, -1)).view_as(images)
    return out.clamp_(0.0, 1.0)


def _blend(images: Tensor, texture: Tensor, mask: Tensor, opacity: Tensor) -> Tensor:
    """Blend texture into images with weight mask * opacity; where the mask is 0 the pixel is exactly kept."""
    weight = mask * opacity[:, None, None, None]
    # lerp returns start exactly for weight 0, so pixels outside the mask are untouched
    return torch.lerp(images, texture, weight.expand_as(images)).clamp_(0.0, 1.0)


def _upsample(maps: Tensor, height: int, width: int) -> Tensor:
    """Bilinear resize of (n, h, w) maps to (n, height, width)."""
    return F.interpolate(maps[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]


def _roll_into(dst: Tensor, src: Tensor, shift_y: int, shift_x: int) -> None:
    """dst[:, y, x] = src[:, y - shift_y, x - shift_x] (cyclic), written in place, for (C, H, W)."""
    h, w = src.shape[-2:]
    sy, sx = shift_y % h, shift_x % w
    for (dy0, dy1, sy0, sy1) in ((sy, h, 0, h - sy), (0, sy, h - sy, h)):
        if dy1 <= dy0:
            continue
        for (dx0, dx1, sx0, sx1) in ((sx, w, 0, w - sx), (0, sx, w - sx, w)):
            if dx1 <= dx0:
                continue
            dst[:, dy0:dy1, dx0:dx1] = src[:, sy0:sy1, sx0:sx1]


def _rotated_rect_mask(
    height: int,
    width: int,
    centre_y: Tensor,
    centre_x: Tensor,
    half_len: Tensor,
    half_width: Tensor,
    angle: Tensor,
) -> Tensor:
    """(n, 1, H, W) float mask of rectangles; ``half_len`` runs along ``angle`` from the x axis."""
    device = centre_y.device
    ys = torch.arange(height, device=device, dtype=torch.float32)[None, :, None] - centre_y[:, None, None]
    xs = torch.arange(width, device=device, dtype=torch.float32)[None, None, :] - centre_x[:, None, None]
    cos = torch.cos(angle)[:, None, None]
    sin = torch.sin(angle)[:, None, None]
    along = xs * cos + ys * sin
    across = ys * cos - xs * sin
    inside = (along.abs() < half_len[:, None, None]) & (across.abs() < half_width[:, None, None])
    return inside[:, None].float()


# --------------------------------------------------------------------------- modes


def _perlin_mode(
    images: Tensor, pool: Tensor, own_index: Tensor, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """DRAEM-style Perlin-blob anomalies; ``pool`` is the whole batch (foreign textures)."""
    n, _, h, w = images.shape
    device = images.device
    # ---- mask: thresholded Perlin noise, optionally focused around one spot
    # (computed at half resolution for speed, then upsampled: the noise is smooth)
    low_h, low_w = (h // 2, w // 2) if min(h, w) >= 128 else (h, w)
    k_y = _randint(gen, _PERLIN_CELL_EXP[0], _PERLIN_CELL_EXP[1], (n,), "cpu")
    k_x = k_y + _randint(gen, -_PERLIN_ANISOTROPY, _PERLIN_ANISOTROPY, (n,), "cpu")
    k_x = k_x.clamp(_PERLIN_CELL_EXP[0], _PERLIN_CELL_EXP[1])
    noise = _perlin_batch(2**k_y, 2**k_x, low_h, low_w, gen, device)
    focus = _rand(gen, (n,), device) < _PERLIN_FOCUS_PROB
    strength = _uniform(gen, 0.8, 2.5, (n,), device) * focus
    centre = _rand(gen, (n, 2), device)
    sigma = _uniform(gen, 0.08, 0.25, (n,), device)
    ys = (torch.arange(low_h, device=device, dtype=torch.float32) + 0.5) / low_h
    xs = (torch.arange(low_w, device=device, dtype=torch.float32) + 0.5) / low_w
    bump_y = torch.exp(-((ys[None, :] - centre[:, :1]) ** 2) / (2.0 * sigma[:, None] ** 2))
    bump_x = torch.exp(-((xs[None, :] - centre[:, 1:]) ** 2) / (2.0 * sigma[:, None] ** 2))
    noise.add_((strength[:, None] * bump_y)[:, :, None] * bump_x[:, None, :])
    if (low_h, low_w) != (h, w):
        noise = _upsample(noise, h, w)
    area = _log_uniform(gen, _PERLIN_AREA[0], _PERLIN_AREA[1], (n,), device)
    # threshold at the (1 - area) quantile, estimated on a subsampled grid (always >= 1 pixel set)
    step = max(1, min(h, w) // 32)
    sample = noise[:, ::step, ::step].reshape(n, -1)
    sorted_sample, _ = torch.sort(sample, dim=1)
    m = sample.shape[1]
    rank = ((1.0 - area) * m).long().clamp_(0, m - 1)
    threshold = torch.gather(sorted_sample, 1, rank[:, None])[:, 0]
    mask = (noise >= threshold[:, None, None]).float()[:, None]

    # ---- texture: 0 other image of the batch, 1 the image itself shifted, 2 procedural
    kind = _randint(gen, 0, 2, (n,), "cpu")
    n_pool = pool.shape[0]
    offset = _randint(gen, 1, max(1, n_pool - 1), (n,), "cpu")
    other = (own_index.cpu() + offset) % n_pool if n_pool > 1 else own_index.cpu()
    shift_y = _randint(gen, h // 8, h - h // 8, (n,), "cpu")
    shift_x = _randint(gen, w // 8, w - w // 8, (n,), "cpu")
    flips = _rand(gen, (n, 2), "cpu") < 0.5
    texture = torch.empty_like(images)
    for i, (kd, oi, sy, sx, fl) in enumerate(
        zip(kind.tolist(), other.tolist(), shift_y.tolist(), shift_x.tolist(), flips.tolist())
    ):
        if kd == 2:
            continue
        src = pool[oi] if kd == 0 else images[i]
        if kd == 0:
            dims = [d for d, f in zip((1, 2), fl) if f]
            if dims:
                src = torch.flip(src, dims=dims)
        _roll_into(texture[i], src, sy, sx)
    kind_d = kind.to(device)
    colourful = (kind_d == 0).float()
    brightness = _uniform(gen, 0.5, 1.5, (n,), device)
    contrast = _uniform(gen, 0.5, 1.6, (n,), device)
    saturation = 1.0 + colourful * _uniform(gen, -0.7, 0.7, (n,), device)
    gains = 1.0 + colourful[:, None] * _uniform(gen, -0.25, 0.25, (n, 3), device)
    texture = _colour_transform(texture, brightness, contrast, saturation, gains)

    procedural = (kind == 2).nonzero()[:, 0]
    if procedural.numel():
        p = int(procedural.numel())
        # two octaves of gradient noise (at half resolution, upsampled) plus per-pixel grain,
        # mapped between two random colours
        kt = _randint(gen, _TEX_CELL_EXP[0], _TEX_CELL_EXP[1], (p,), "cpu")
        cells = torch.cat([2**kt, 2 ** (kt + 1)])
        octaves = _perlin_batch(cells, cells, low_h, low_w, gen, device)
        detail = _uniform(gen, 0.2, 0.7, (p,), device)
        tex_noise = octaves[:p] + detail[:, None, None] * octaves[p:]
        if (low_h, low_w) != (h, w):
            tex_noise = _upsample(tex_noise, h, w)
        grain = _uniform(gen, 0.0, 0.3, (p,), device)
        tex_noise.add_(grain[:, None, None] * (_rand(gen, (p, h, w), device) - 0.5))
        gain = _uniform(gen, 1.5, 6.0, (p,), device)
        t = torch.sigmoid(tex_noise * gain[:, None, None])[:, None]
        c1 = _rand(gen, (p, 3), device)[:, :, None, None]
        c2 = _rand(gen, (p, 3), device)[:, :, None, None]
        texture[procedural.to(device)] = c1 + (c2 - c1) * t

    texture = _match_gray(texture, _gray_flags(images))
    opacity = _uniform(gen, _PERLIN_OPACITY[0], _PERLIN_OPACITY[1], (n,), device)
    return _blend(images, texture, mask, opacity), mask


def _cutpaste_mode(images: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """CutPaste: a rectangle or a thin rotated scar copied from elsewhere in the image."""
    n, _, h, w = images.shape
    device = images.device
    scale = min(h, w) / 256.0
    # rectangle geometry (integer, fully inside the image)
    area = _uniform(gen, _CP_AREA[0], _CP_AREA[1], (n,), "cpu") * (h * w)
    aspect = _log_uniform(gen, _ASPECT[0], _ASPECT[1], (n,), "cpu")
    rect_h = torch.sqrt(area * aspect).round().clamp(1, max(1, h - 1)).long()
    rect_w = torch.sqrt(area / aspect).round().clamp(1, max(1, w - 1)).long()
    pos = _rand(gen, (n, 4), "cpu")  # src y, src x, dst y, dst x (fractions of the free range)
    src_y = (pos[:, 0] * (h - rect_h + 1)).long()
    src_x = (pos[:, 1] * (w - rect_w + 1)).long()
    dst_y = (pos[:, 2] * (h - rect_h + 1)).long()
    dst_x = (pos[:, 3] * (w - rect_w + 1)).long()
    # scar geometry: centre anywhere, source shifted by a random offset (wrapping)
    scar = _rand(gen, (n,), "cpu") < _SCAR_PROB
    scar_w = _uniform(gen, _SCAR_WIDTH[0], _SCAR_WIDTH[1], (n,), "cpu") * scale
    scar_l = _uniform(gen, _SCAR_LENGTH[0], _SCAR_LENGTH[1], (n,), "cpu") * scale
    scar_angle = _uniform(gen, 0.0, math.pi, (n,), "cpu")
    scar_cy = _randint(gen, 0, h - 1, (n,), "cpu").float()
    scar_cx = _randint(gen, 0, w - 1, (n,), "cpu").float()
    scar_dy = _randint(gen, h // 8, h - h // 8, (n,), "cpu")
    scar_dx = _randint(gen, w // 8, w - w // 8, (n,), "cpu")

    centre_y = torch.where(scar, scar_cy, dst_y.float() + (rect_h.float() - 1.0) / 2.0)
    centre_x = torch.where(scar, scar_cx, dst_x.float() + (rect_w.float() - 1.0) / 2.0)
    half_len = torch.where(scar, scar_l / 2.0, rect_w.float() / 2.0).clamp(min=0.75)
    half_wid = torch.where(scar, scar_w / 2.0, rect_h.float() / 2.0).clamp(min=0.75)
    angle = torch.where(scar, scar_angle, torch.zeros(n))
    shift_y = torch.where(scar, scar_dy, dst_y - src_y)
    shift_x = torch.where(scar, scar_dx, dst_x - src_x)
    geometry = [t.to(device) for t in (centre_y, centre_x, half_len, half_wid, angle)]
    mask = _rotated_rect_mask(h, w, *geometry)

    source = torch.empty_like(images)
    for i, (sy, sx) in enumerate(zip(shift_y.tolist(), shift_x.tolist())):
        _roll_into(source[i], images[i], sy, sx)
    jitter = (_rand(gen, (n,), device) < _CP_JITTER_PROB).float()
    brightness = 1.0 + jitter * _uniform(gen, -0.25, 0.25, (n,), device)
    contrast = 1.0 + jitter * _uniform(gen, -0.25, 0.25, (n,), device)
    saturation = 1.0 + jitter * _uniform(gen, -0.3, 0.3, (n,), device)
    gains = 1.0 + jitter[:, None] * _uniform(gen, -0.1, 0.1, (n, 3), device)
    source = _colour_transform(source, brightness, contrast, saturation, gains)
    source = _match_gray(source, _gray_flags(images))
    return torch.where(mask > 0, source, images), mask


def _erase_mode(images: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random erasing: 1-3 rectangles filled with a constant colour or uniform noise."""
    n, _, h, w = images.shape
    device = images.device
    k = _ERASE_MAX_RECTS
    count = _randint(gen, 1, k, (n,), device)
    area = _log_uniform(gen, _ERASE_AREA[0], _ERASE_AREA[1], (n, k), device) * (h * w)
    aspect = _log_uniform(gen, _ASPECT[0], _ASPECT[1], (n, k), device)
    rect_h = torch.sqrt(area * aspect).round().clamp(1, h)
    rect_w = torch.sqrt(area / aspect).round().clamp(1, w)
    pos = _rand(gen, (n, k, 2), device)
    top = (pos[..., 0] * (h - rect_h + 1)).floor()
    left = (pos[..., 1] * (w - rect_w + 1)).floor()
    active = torch.arange(k, device=device)[None, :] < count[:, None]  # (n, k)
    ys = torch.arange(h, device=device, dtype=torch.float32)
    xs = torch.arange(w, device=device, dtype=torch.float32)
    in_rows = (ys[None, None, :] >= top[..., None]) & (ys[None, None, :] < (top + rect_h)[..., None])
    in_cols = (xs[None, None, :] >= left[..., None]) & (xs[None, None, :] < (left + rect_w)[..., None])
    in_rows = in_rows & active[..., None]
    inside = (in_rows[:, :, :, None] & in_cols[:, :, None, :]).any(dim=1)
    mask = inside[:, None].float()

    use_noise = _rand(gen, (n,), device) < _ERASE_NOISE_PROB
    colour = _rand(gen, (n, 3), device)[:, :, None, None]
    fill = colour.expand(n, 3, h, w).clone()
    noisy = use_noise.nonzero()[:, 0]
    if noisy.numel():
        fill[noisy] = _rand(gen, (int(noisy.numel()), 3, h, w), device)
    fill = _match_gray(fill, _gray_flags(images))
    return torch.where(mask > 0, fill, images), mask


# --------------------------------------------------------------------------- public API


def _check(mode: str, probability: float) -> None:
    """Raise ParamsError for an unknown mode or a probability outside [0, 1]."""
    if not isinstance(mode, str) or mode not in MODES:
        raise ParamsError(f"{_KEY}: unknown corruption mode {mode!r}; expected one of {', '.join(MODES)}")
    if isinstance(probability, bool) or not isinstance(probability, numbers.Real):
        raise ParamsError(f"{_PROB_KEY}: must be a number in [0, 1], got {probability!r}")
    if not 0.0 <= float(probability) <= 1.0:
        raise ParamsError(f"{_PROB_KEY}: must be in [0, 1], got {probability!r}")


def corrupt_batch(
    images: Tensor,
    mode: str,
    generator: torch.Generator,
    probability: float = 0.75,
) -> tuple[Tensor, Tensor]:
    """Corrupt a batch with synthetic anomalies.

    images: (N, 3, H, W) float in [0, 1] on any device (not modified).
    Returns (corrupted, mask): corrupted has the shape, dtype and device of
    ``images``; mask is (N, 1, H, W) float32 in {0, 1}, 1 on the region that was
    replaced or blended (for ``perlin`` the region, regardless of opacity).
    Each image is corrupted with ``probability``; the others come back
    unchanged with an all-zero mask.  Same generator state, same output.
    """
    _check(mode, probability)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"corrupt_batch expects images of shape (N, 3, H, W), got {tuple(images.shape)}")
    n = images.shape[0]
    device = images.device
    if mode == "none" or n == 0 or probability == 0:
        return _untouched(images)

    work = images.float()
    selected = _rand(generator, (n,), "cpu") < float(probability)
    if mode == "mixed":
        u = _rand(generator, (n,), "cpu")
        p_perlin, p_cut, _ = _MIXED_PROBS
        choice = torch.where(u < p_perlin, 0, torch.where(u < p_perlin + p_cut, 1, 2))
    else:
        choice = torch.full((n,), ("perlin", "cutpaste", "erase").index(mode), dtype=torch.long)

    result: tuple[Tensor, Tensor] | None = None  # (out, mask), allocated when a first subset is corrupted
    for code in range(3):
        idx = (selected & (choice == code)).nonzero()[:, 0]
        if idx.numel() == 0:
            continue
        whole = idx.numel() == n  # every image, same mode: no gather/scatter copies
        idx_d = idx.to(device)
        sub = work if whole else work[idx_d]
        if code == 0:
            corrupted, sub_mask = _perlin_mode(sub, work, idx, generator)
        elif code == 1:
            corrupted, sub_mask = _cutpaste_mode(sub, generator)
        else:
            corrupted, sub_mask = _erase_mode(sub, generator)
        if whole:
            return corrupted.to(images.dtype), sub_mask
        out, mask = result = result or _untouched(images)
        out[idx_d] = corrupted.to(out.dtype)
        mask[idx_d] = sub_mask
    return result or _untouched(images)  # nothing selected: unchanged


def _untouched(images: Tensor) -> tuple[Tensor, Tensor]:
    """A copy of ``images`` and an all-zero (N, 1, H, W) defect mask."""
    n, _, h, w = images.shape
    return images.clone(), torch.zeros((n, 1, h, w), device=images.device, dtype=torch.float32)
