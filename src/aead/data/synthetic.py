"""An embedded synthetic data set in MVTec AD layout.

Four categories imitate their MVTec AD namesakes (``bottle``, ``hazelnut``, ``cable``, ``tile``).  Every image is drawn
with vectorised numpy from its own random stream, ``np.random.default_rng([seed, category_index, split_index, i])``,
so an image depends only on the seed, its category, its split and its index: not on which other categories are
generated or on how many images the other splits hold.

Layout written by :func:`generate_dataset` (as in MVTec AD)::

    <root>/<category>/train/good/000.png
    <root>/<category>/test/good/000.png
    <root>/<category>/test/<defect_type>/000.png
    <root>/<category>/ground_truth/<defect_type>/000_mask.png

Images are 8-bit RGB PNGs; masks are 8-bit L-mode PNGs holding 0 or 255.  A mask marks exactly the pixels the defect
changed: every pixel outside it equals the defect-free image drawn from the same stream.

How one image is drawn: the category's clean scene (geometry, colours, texture) comes first, then the photometric
"look" (gain, contrast, tint, illumination gradient, sensor noise), then, for a defect image, the defect's own
parameters.  The look is applied after the defect, pixel by pixel, so the defect-free and the defect image share it.
"""

from __future__ import annotations

import math
import numbers
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from aead.errors import ParamsError

__all__ = ["CATEGORIES", "generate_dataset"]

# The order of categories and of each category's defect types fixes their random-stream indices: append, never
# reorder.  _DEFECTS is private so that editing CATEGORIES at run time cannot change what is generated.
_DEFECTS: dict[str, tuple[str, ...]] = {
    "bottle": ("broken_large", "contamination", "broken_small"),
    "hazelnut": ("crack", "hole", "print"),
    "cable": ("missing_wire", "cable_swap", "poke_insulation"),
    "tile": ("crack", "glue_strip", "oil"),
}
_CATEGORY_INDEX = {name: i for i, name in enumerate(_DEFECTS)}

#: Each supported category and its defect types (in MVTec AD's naming).
CATEGORIES: dict[str, tuple[str, ...]] = dict(_DEFECTS)
_SPLIT_TRAIN, _SPLIT_TEST_GOOD, _SPLIT_FIRST_DEFECT = 0, 1, 2

# A defect pixel counts as changed (and is marked) only if its blend weight exceeds this and its clean value moved by
# more than _MIN_CHANGE; after the look (whose gain is at least ~0.7) that still moves the 8-bit value.
_MIN_WEIGHT = 0.1
_MIN_CHANGE = 3.0 / 255.0

_F32 = np.float32
_TAU = 2.0 * math.pi


# ----------------------------------------------------------------------------------------------------------------
# drawing helpers (coordinates are normalised: the image spans [0, 1] on both axes, one pixel is 1 / size)
# ----------------------------------------------------------------------------------------------------------------


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates as broadcastable rows: x of shape (1, size), y of shape (size, 1)."""
    c = (np.arange(size, dtype=_F32) + _F32(0.5)) / _F32(size)
    return c[None, :], c[:, None]


def _cover(sd: np.ndarray, soft: float) -> np.ndarray:
    """Anti-aliased coverage of a region from its signed distance ``sd`` (negative inside), edge ``soft`` wide."""
    return np.clip(_F32(0.5) - np.asarray(sd, dtype=_F32) / _F32(soft), 0.0, 1.0).astype(_F32, copy=False)


def _smoothstep(e0: float, e1: float, v: np.ndarray) -> np.ndarray:
    t = np.clip((v - _F32(e0)) / _F32(e1 - e0), 0.0, 1.0)
    return (t * t * (_F32(3.0) - _F32(2.0) * t)).astype(_F32, copy=False)


def _noise(rng: np.random.Generator, size: int, cells: float) -> np.ndarray:
    """Smooth zero-mean, unit-variance noise with about ``cells`` features across the image.

    Coarse noise is a random grid of about ``cells`` x ``cells`` values smoothed by separable cubic B-spline
    interpolation; fine noise (fewer than 6 pixels per cell, where interpolation would leave a visible grid) is
    blurred full-resolution white noise.
    """
    n = int(min(max(round(cells), 2), size))
    if size / n < 6.0:
        g = rng.standard_normal((size, size), dtype=_F32)
        z = g if n == size else ndimage.gaussian_filter(g, 0.4 * size / n, mode="wrap")
    else:
        g = rng.standard_normal((n + 4, n + 4), dtype=_F32)
        idx, wts = _bspline_taps(size, n)
        rows = sum(w[:, None] * g[i, :] for i, w in zip(idx, wts))  # (size, n + 4)
        z = sum(rows[:, i] * w[None, :] for i, w in zip(idx, wts))  # (size, size)
    z = z - z.mean()
    return (z / (z.std() + _F32(1e-6))).astype(_F32, copy=False)


def _bspline_taps(size: int, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Indices and weights of the 4 cubic B-spline taps that map a grid of n + 4 knots onto ``size`` pixels.

    Elementwise numpy, not a matrix product, so results do not depend on the BLAS library."""
    t = 1.0 + (np.arange(size, dtype=np.float64) + 0.5) * (n / size)
    i0 = np.floor(t).astype(np.intp)
    f = (t - i0).astype(_F32)
    f2, f3 = f * f, f * f * f
    wts = [
        (1.0 - f) ** 3 / 6.0,
        (3.0 * f3 - 6.0 * f2 + 4.0) / 6.0,
        (-3.0 * f3 + 3.0 * f2 + 3.0 * f + 1.0) / 6.0,
        f3 / 6.0,
    ]
    return [i0 - 1 + k for k in range(4)], [w.astype(_F32) for w in wts]


def _fbm(rng: np.random.Generator, size: int, cells: Sequence[float], amps: Sequence[float]) -> np.ndarray:
    """Multi-octave smooth noise, normalised to zero mean and unit variance."""
    acc = np.zeros((size, size), dtype=_F32)
    for c, a in zip(cells, amps):
        acc += _F32(a) * _noise(rng, size, c)
    acc -= acc.mean()
    return (acc / (acc.std() + _F32(1e-6))).astype(_F32, copy=False)


def _periodic(rng: np.random.Generator, ang: np.ndarray, knots: int, amp: float) -> np.ndarray:
    """Smooth random function of an angle (radians), zero mean, standard deviation about ``amp``."""
    v = rng.standard_normal(knots)
    v = ndimage.gaussian_filter1d(v, 1.0, mode="wrap")
    v = (v - v.mean()) / (v.std() + 1e-9) * amp
    grid = np.arange(knots) * (_TAU / knots)
    return np.interp(ang, grid, v, period=_TAU).astype(_F32)


def _blob_sd(
    rng: np.random.Generator,
    x: np.ndarray,
    y: np.ndarray,
    cx: float,
    cy: float,
    r0: float,
    irregular: float = 0.25,
    aspect: float = 1.0,
    rot: float = 0.0,
) -> np.ndarray:
    """Approximate signed distance to an irregular blob: a rotated ellipse (long axis ``r0``) with a wavy border."""
    dx = x - _F32(cx)
    dy = y - _F32(cy)
    c, s = _F32(math.cos(rot)), _F32(math.sin(rot))
    u = c * dx + s * dy
    v = (c * dy - s * dx) * _F32(aspect)
    rho = np.hypot(u, v)
    th = np.arctan2(v, u)
    k = np.arange(2, 7)
    amp = irregular * rng.uniform(0.3, 1.0, k.size) / np.sqrt(k)
    ph = rng.uniform(0.0, _TAU, k.size)
    mod = np.ones_like(rho)
    for kk, a, p in zip(k, amp, ph):
        mod += _F32(a) * np.cos(_F32(kk) * th + _F32(p))
    return (rho - _F32(r0) * mod).astype(_F32, copy=False)


def _random_walk(
    rng: np.random.Generator, start: Sequence[float], angle: float, length: float, steps: int, wiggle: float
) -> np.ndarray:
    """Points (steps + 1, 2) of a jagged line: constant step length, direction jittered by ``wiggle`` radians."""
    angs = angle + np.cumsum(rng.normal(0.0, wiggle, steps))
    step = length / steps
    d = np.stack([np.cos(angs), np.sin(angs)], axis=1) * step
    return np.vstack([np.asarray(start, dtype=float)[None, :], np.asarray(start, dtype=float) + np.cumsum(d, axis=0)])


def _polyline_dist(x: np.ndarray, y: np.ndarray, lines: Sequence[np.ndarray], margin: float) -> np.ndarray:
    """Distance from every pixel to the nearest of the polylines; computed in their bounding box grown by ``margin``
    (pixels further away get a large value)."""
    size = x.shape[1]
    out = np.full((size, size), 10.0, dtype=_F32)
    pts = np.concatenate([np.asarray(p, dtype=float) for p in lines])
    j0 = int(np.clip(math.floor((pts[:, 0].min() - margin) * size), 0, size))
    j1 = int(np.clip(math.ceil((pts[:, 0].max() + margin) * size) + 1, 0, size))
    i0 = int(np.clip(math.floor((pts[:, 1].min() - margin) * size), 0, size))
    i1 = int(np.clip(math.ceil((pts[:, 1].max() + margin) * size) + 1, 0, size))
    if j1 <= j0 or i1 <= i0:
        return out
    xs = x[:, j0:j1]
    ys = y[i0:i1, :]
    d2 = np.full((i1 - i0, j1 - j0), np.inf, dtype=_F32)
    for p in lines:
        p = np.asarray(p, dtype=float)
        for (x0, y0), (x1, y1) in zip(p[:-1], p[1:]):
            ex, ey = x1 - x0, y1 - y0
            l2 = ex * ex + ey * ey
            px_ = xs - _F32(x0)
            py_ = ys - _F32(y0)
            if l2 < 1e-12:
                qx, qy = px_, py_
            else:
                t = np.clip((px_ * _F32(ex) + py_ * _F32(ey)) / _F32(l2), 0.0, 1.0)
                qx = px_ - t * _F32(ex)
                qy = py_ - t * _F32(ey)
            d2 = np.minimum(d2, qx * qx + qy * qy)
    out[i0:i1, j0:j1] = np.sqrt(d2)
    return out


def _over(img: np.ndarray, colour: np.ndarray | Sequence[float], w: np.ndarray) -> np.ndarray:
    """``img`` with ``colour`` (RGB triple or image) blended over it with weight ``w`` (H, W)."""
    col = np.asarray(colour, dtype=_F32)
    return (img + (col - img) * w[..., None]).astype(_F32, copy=False)


def _rgb(v: np.ndarray) -> np.ndarray:
    """A grey (H, W) array as (H, W, 3)."""
    return np.repeat(v[..., None], 3, axis=2).astype(_F32, copy=False)


# ----------------------------------------------------------------------------------------------------------------
# the photometric look shared by the defect-free and the defect image
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Look:
    gain: float
    contrast: float
    pivot: float
    tint: np.ndarray  # (3,)
    illum: np.ndarray  # (H, W, 1)
    noise: np.ndarray  # (H, W, 3)


def _draw_look(
    rng: np.random.Generator,
    size: int,
    gain: float = 0.1,
    contrast: float = 0.1,
    tint: float = 0.03,
    illum: float = 0.05,
    noise: tuple[float, float] = (0.006, 0.014),
    pivot: float = 0.35,
) -> _Look:
    x, y = _coords(size)
    g = float(rng.uniform(1.0 - gain, 1.0 + gain))
    c = float(rng.uniform(1.0 - contrast, 1.0 + contrast))
    t = (1.0 + rng.uniform(-tint, tint, 3)).astype(_F32)
    a = rng.uniform(0.0, _TAU)
    m = rng.uniform(0.0, illum)
    field = _F32(1.0) + _F32(2.0 * m) * (_F32(math.cos(a)) * (x - _F32(0.5)) + _F32(math.sin(a)) * (y - _F32(0.5)))
    sigma = float(rng.uniform(*noise))
    n = rng.standard_normal((size, size, 3), dtype=_F32) * _F32(sigma)
    return _Look(g, c, pivot, t, field[..., None].astype(_F32), n)


def _finish(img: np.ndarray, look: _Look) -> np.ndarray:
    """Apply the look pixel by pixel and quantise to uint8 RGB."""
    v = img * look.illum * _F32(look.gain) * look.tint
    v = (v - _F32(look.pivot)) * _F32(look.contrast) + _F32(look.pivot) + look.noise
    return np.rint(np.clip(v, 0.0, 1.0) * _F32(255.0)).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# scenes
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Scene:
    img: np.ndarray  # (H, W, 3) float32, clean (before the look)
    ctx: dict


def _rot(u: float, v: float, theta: float) -> tuple[float, float]:
    c, s = math.cos(theta), math.sin(theta)
    return c * u - s * v, s * u + c * v


# --- bottle -----------------------------------------------------------------------------------------------------


def _bottle_scene(size: int, rng: np.random.Generator) -> _Scene:
    x, y = _coords(size)
    px = 1.0 / size
    cx, cy = 0.5 + rng.uniform(-0.03, 0.03, 2)
    big_r = 0.43 * rng.uniform(0.95, 1.05)
    dx, dy = x - _F32(cx), y - _F32(cy)
    r = np.hypot(dx, dy)
    ang = np.arctan2(dy, dx)
    q = r / _F32(big_r)

    bg = _F32(rng.uniform(0.025, 0.055)) * (_F32(1.0) + _F32(0.3) * _noise(rng, size, 5))
    background = _rgb(bg) * np.array([1.0, 1.0, 0.95], dtype=_F32)

    hole = 0.36 * rng.uniform(0.95, 1.05)
    neck_in = hole + 0.05 * rng.uniform(0.9, 1.1)
    neck_out = 0.63 * rng.uniform(0.97, 1.03)
    band = 0.86 * rng.uniform(0.97, 1.02)
    e = 0.012
    knots = [
        (0.0, 0.13),
        (0.45 * hole, 0.05),
        (hole - e, 0.07),
        (hole + e, 0.80),
        (neck_in, 0.66),
        (0.5 * (neck_in + neck_out), 0.58),
        (neck_out - e, 0.50),
        (neck_out + e, 0.24),
        (0.5 * (neck_out + band), 0.19),
        (band, 0.27),
        (band + 0.04, 0.21),
        (0.955, 0.24),
        (0.985, 0.42),
        (1.0, 0.30),
        (1.2, 0.30),
    ]
    kq = np.maximum.accumulate(np.array([k[0] for k in knots]) + np.arange(len(knots)) * 1e-6)
    kv = np.array([k[1] for k in knots]) * rng.uniform(0.92, 1.08)
    lum = np.interp(q, kq, kv).astype(_F32)
    light = rng.uniform(0.0, _TAU)
    lum *= _F32(1.0) + _F32(0.16) * np.cos(ang - _F32(light)) * np.clip(q, 0.0, 1.0)
    lum *= _F32(1.0) + _periodic(rng, ang, 96, 0.05) * np.clip(q - _F32(0.3), 0.0, 1.0)
    lum *= _F32(1.0) + _F32(0.03) * _noise(rng, size, size / 4)

    glass = (np.array([0.9, 1.0, 0.84]) * (1.0 + rng.uniform(-0.05, 0.05, 3))).astype(_F32)
    opening = _smoothstep(hole + e, hole - e, q)
    colour = glass + (np.ones(3, dtype=_F32) - glass) * opening[..., None]
    bottle = lum[..., None] * colour
    alpha = _cover(r - _F32(big_r), px)
    img = _over(background, bottle, alpha)
    ctx = dict(x=x, y=y, px=px, cx=cx, cy=cy, R=big_r, r=r, ang=ang, q=q, alpha=alpha, background=background,
               neck_out=neck_out, hole=hole)
    return _Scene(img, ctx)


def _wrap(a: np.ndarray) -> np.ndarray:
    return (a + _F32(math.pi)) % _F32(_TAU) - _F32(math.pi)


def _bottle_broken_large(sc: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    c = sc.ctx
    px, big_r, r, ang = c["px"], c["R"], c["r"], c["ang"]
    half = 0.5 * rng.uniform(0.35, 0.8)
    a0 = rng.uniform(-math.pi, math.pi)
    depth = rng.uniform(0.12, 0.3)
    dang = _wrap(ang - _F32(a0))
    t = np.clip(np.abs(dang) / _F32(half), 0.0, 1.0)
    jag = _periodic(rng, ang, 180, 0.2)
    inner = _F32(big_r) * (_F32(1.0) - _F32(depth) * np.sqrt(_F32(1.0) - t * t) * (_F32(1.0) + jag))
    sd = np.maximum(inner - r, r * (np.abs(dang) - _F32(half)))
    gone = _cover(sd, px) * c["alpha"]
    img = _over(sc.img, c["background"], gone)
    # the fracture surface catches light: a thin bright band along the break, inside the remaining glass
    edge_w = max(1.2 * px, 0.012)
    edge = np.clip(_F32(1.0) - np.abs(sd - _F32(edge_w)) / _F32(edge_w), 0.0, 1.0) * c["alpha"] * _F32(0.6)
    edge *= (sd > 0).astype(_F32)
    img = _over(img, sc.img * _F32(1.6) + _F32(0.08), edge)
    return img, np.maximum(gone, edge)


def _bottle_contamination(sc: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    c = sc.ctx
    x, y, px = c["x"], c["y"], c["px"]
    rb = max(rng.uniform(0.03, 0.09), 2.0 * px)
    rho = rng.uniform(0.0, 0.8 * c["R"] - rb)
    phi = rng.uniform(0.0, _TAU)
    bx, by = c["cx"] + rho * math.cos(phi), c["cy"] + rho * math.sin(phi)
    sd = _blob_sd(rng, x, y, bx, by, rb, irregular=0.45, aspect=rng.uniform(1.0, 1.8), rot=rng.uniform(0, _TAU))
    palette = np.array(
        [[0.48, 0.32, 0.16], [0.82, 0.8, 0.74], [0.38, 0.12, 0.1], [0.15, 0.15, 0.13], [0.55, 0.6, 0.35]], dtype=_F32
    )
    col = palette[rng.integers(len(palette))] * _F32(rng.uniform(0.8, 1.15))
    tex = _F32(1.0) + _F32(0.2) * _noise(rng, x.shape[1], 24)
    w = _cover(sd, px) * _F32(rng.uniform(0.65, 0.95)) * c["alpha"]
    return _over(sc.img, col * tex[..., None], w), w


def _bottle_broken_small(sc: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    c = sc.ctx
    x, y, px = c["x"], c["y"], c["px"]
    rn = max(rng.uniform(0.025, 0.045), 1.8 * px)
    phi = rng.uniform(0.0, _TAU)
    # on the outer rim, or on the edge of the bright neck ring
    at = c["R"] if rng.random() < 0.6 else c["neck_out"] * c["R"]
    nx, ny = c["cx"] + at * math.cos(phi), c["cy"] + at * math.sin(phi)
    sd = _blob_sd(rng, x, y, nx, ny, rn, irregular=0.35, aspect=rng.uniform(1.0, 1.6), rot=phi)
    notch = _cover(sd, px) * c["alpha"]
    mix = _F32(rng.uniform(0.55, 0.85))
    darker = sc.img + (c["background"] - sc.img) * mix
    img = _over(sc.img, darker, notch)
    # a short crack running inwards from the notch
    length = rng.uniform(0.05, 0.1)
    pts = _random_walk(rng, (nx, ny), phi + math.pi + rng.normal(0.0, 0.5), length, 5, 0.4)
    width = max(rng.uniform(0.006, 0.01), px)
    dist = _polyline_dist(x, y, [pts], width + 2 * px)
    crack = _cover(dist - _F32(width / 2), px) * c["alpha"] * _F32(rng.uniform(0.5, 0.8))
    shade = sc.img * _F32(0.55) if rng.random() < 0.5 else sc.img * _F32(1.4) + _F32(0.08)
    img = _over(img, shade, crack)
    return img, np.maximum(notch, crack)


# --- hazelnut ---------------------------------------------------------------------------------------------------


def _hazelnut_scene(size: int, rng: np.random.Generator) -> _Scene:
    x, y = _coords(size)
    px = 1.0 / size
    cx, cy = 0.5 + rng.uniform(-0.05, 0.05, 2)
    theta = rng.uniform(0.0, _TAU)
    a = 0.33 * rng.uniform(0.94, 1.06)
    b = 0.28 * rng.uniform(0.94, 1.06)
    dx, dy = x - _F32(cx), y - _F32(cy)
    ct, st = _F32(math.cos(theta)), _F32(math.sin(theta))
    u = ct * dx + st * dy
    v = ct * dy - st * dx
    un = u / _F32(a)
    g = _F32(1.0) - _F32(0.62) * np.clip(un, 0.0, 1.0) ** _F32(1.6)
    g = np.maximum(g, _F32(0.05))
    vn = v / (_F32(b) * g)
    f = np.sqrt(un * un + vn * vn)
    f = f * (_F32(1.0) + _periodic(rng, np.arctan2(vn, un), 64, 0.015))
    sd = (f - _F32(1.0)) * _F32(b) * np.minimum(g, _F32(1.0)) * _F32(0.9)
    alpha = _cover(sd, px)

    bg = _F32(rng.uniform(0.01, 0.035)) * (_F32(1.0) + _F32(0.3) * _noise(rng, size, 5))
    background = _rgb(bg)

    # fibrous stripes running from the wide base to the tip: noise indexed by (position along, position across)
    nu, nv = 6, 72
    grid = ndimage.gaussian_filter(rng.standard_normal((nu, nv)), (0.6, 0.8), mode="wrap")
    grid = (grid - grid.mean()) / (grid.std() + 1e-9)
    iu = np.clip((un + _F32(1.2)) / _F32(2.4), 0.0, 1.0) * _F32(nu - 1)
    iv = np.clip((np.clip(vn, -1.3, 1.3) + _F32(1.3)) / _F32(2.6), 0.0, 1.0) * _F32(nv - 1)
    iu, iv = np.broadcast_arrays(iu, iv)
    fib = ndimage.map_coordinates(grid, [iu.ravel(), iv.ravel()], order=1, mode="nearest").reshape(iu.shape)
    fib = fib.astype(_F32)
    grain = _noise(rng, size, size / 3)
    blotch = _noise(rng, size, 6)

    dome = np.sqrt(np.clip(_F32(1.0) - f * f, 0.0, 1.0))
    la = rng.uniform(0.0, _TAU)
    side = (dx * _F32(math.cos(la)) + dy * _F32(math.sin(la))) / _F32(a)
    shade = (_F32(0.45) + _F32(0.55) * dome) * (_F32(1.0) + _F32(0.25) * side)
    shade *= _F32(1.0) + _F32(0.2) * fib + _F32(0.06) * grain + _F32(0.07) * blotch

    brown = (np.array([0.56, 0.36, 0.19]) * rng.uniform(0.88, 1.1) * (1 + rng.uniform(-0.05, 0.05, 3))).astype(_F32)
    nut = shade[..., None] * brown
    # the lighter, rough attachment scar at the wide end and a darker tip
    scar = _smoothstep(-0.62, -0.9, un) * _smoothstep(0.85, 0.5, np.abs(vn))
    scar_col = np.array([0.66, 0.56, 0.42], dtype=_F32) * (
        (_F32(0.75) + _F32(0.25) * dome) * (_F32(1.0) + _F32(0.18) * grain)
    )[..., None]
    nut = _over(nut, scar_col, scar * _F32(0.85))
    tip = _smoothstep(0.75, 1.0, un) * _F32(0.45)
    nut = _over(nut, nut * _F32(0.5), tip)
    img = _over(background, nut, alpha)
    ctx = dict(x=x, y=y, px=px, cx=cx, cy=cy, a=a, b=b, theta=theta, f=f, alpha=alpha)
    return _Scene(img, ctx)


def _hazelnut_point(c: dict, rng: np.random.Generator, within: float) -> tuple[float, float]:
    """A random point of the nut whose normalised radius is at most ``within``."""
    rad = within * math.sqrt(rng.uniform(0.0, 1.0))
    phi = rng.uniform(0.0, _TAU)
    un, vn = rad * math.cos(phi), rad * math.sin(phi)
    g = max(1.0 - 0.62 * max(un, 0.0) ** 1.6, 0.05)
    du, dv = _rot(un * c["a"], vn * c["b"] * g, c["theta"])
    return c["cx"] + du, c["cy"] + dv


def _hazelnut_crack(sc: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    c = sc.ctx
    x, y, px = c["x"], c["y"], c["px"]
    start = _hazelnut_point(c, rng, 0.75)
    length = rng.uniform(0.15, 0.45)
    pts = _random_walk(rng, start, rng.uniform(0.0, _TAU), length, 12, 0.35)
    lines = [pts]
    if rng.random() < 0.5:
        k = int(rng.integers(3, 10))
        lines.append(_random_walk(rng, pts[k], rng.uniform(0.0, _TAU), length * rng.uniform(0.2, 0.45), 5, 0.4))
    width = max(rng.uniform(0.008, 0.015), px)
    dist = _polyline_dist(x, y, lines, width + 2 * px)
    w = _cover(dist - _F32(width / 2), px) * c["alpha"] * _F32(rng.uniform(0.75, 0.95))
    dark = np.array([0.07, 0.045, 0.03], dtype=_F32)
    return _over(sc.img, dark, w), w


def _hazelnut_hole(sc: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    c = sc.ctx
    x, y, px = c["x"], c["y"], c["px"]
    hx, hy = _hazelnut_point(c, rng, 0.65)
    rh = max(rng.uniform(0.025, 0.06), 1.6 * px)
    sd = _blob_sd(rng, x, y, hx, hy, rh, irregular=0.2, aspect=rng.uniform(1.0, 1.4), rot=rng.uniform(0, _TAU))
    rim_w = max(0.4 * rh, 1.2 * px)
    rim = _cover(sd - _F32(rim_w), px) * c["alpha"]
    inner = _cover(sd, px) * c["alpha"]
    img = _over(sc.img, sc.img * _F32(1.35) + np.array([0.1, 0.08, 0.05], dtype=_F32), rim * _F32(0.8))
    depth = np.clip(_F32(1.0) + sd / _F32(rh), 0.0, 1.0)  # 0 at the centre, 1 at the border
    hole = np.array([0.04, 0.03, 0.02], dtype=_F32) + np.array([0.12, 0.07, 0.04], dtype=_F32) * depth[..., None]
    img = _over(img, hole, inner)
    return img, np.maximum(rim * _F32(0.8), inner)


def _hazelnut_print(sc: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    c = sc.ctx
    x, y, px = c["x"], c["y"], c["px"]
    ox, oy = _hazelnut_point(c, rng, 0.45)
    h = rng.uniform(0.05, 0.09)
    n_glyphs = int(rng.integers(2, 6))
    direction = rng.uniform(0.0, _TAU)
    lines = []
    for gi in range(n_glyphs):
        gx = (gi - (n_glyphs - 1) / 2) * 0.8 * h
        for _ in range(int(rng.integers(2, 4))):
            n_pts = int(rng.integers(2, 4))
            lx = gx + rng.uniform(-0.3 * h, 0.3 * h, n_pts)
            ly = rng.uniform(-0.5 * h, 0.5 * h, n_pts)
            du, dv = _rot(lx, ly, direction)  # type: ignore[arg-type]
            lines.append(np.stack([ox + du, oy + dv], axis=1))
    width = max(rng.uniform(0.008, 0.014), px)
    dist = _polyline_dist(x, y, lines, width + 2 * px)
    palette = np.array([[0.75, 0.1, 0.1], [0.08, 0.08, 0.1], [0.12, 0.2, 0.62], [0.5, 0.12, 0.5], [0.1, 0.4, 0.15]],
                       dtype=_F32)
    col = palette[rng.integers(len(palette))]
    w = _cover(dist - _F32(width / 2), px) * c["alpha"] * _F32(rng.uniform(0.75, 0.95))
    return _over(sc.img, col, w), w


# --- cable ------------------------------------------------------------------------------------------------------


_CABLE_COLOURS = np.array([[0.2, 0.56, 0.28], [0.16, 0.32, 0.7], [0.47, 0.33, 0.22]], dtype=_F32)


def _cable_scene(size: int, rng: np.random.Generator) -> _Scene:
    x, y = _coords(size)
    px = 1.0 / size
    cx, cy = 0.5 + rng.uniform(-0.025, 0.025, 2)
    s = rng.uniform(0.97, 1.03)
    r_sheath, r_fill = 0.47 * s, 0.41 * s
    d_core, r_core, r_cu = 0.205 * s, 0.145 * s, 0.085 * s
    phi0 = -math.pi / 2 + math.radians(rng.uniform(-10.0, 10.0))
    dx, dy = x - _F32(cx), y - _F32(cy)
    r = np.hypot(dx, dy)

    bg = _F32(rng.uniform(0.08, 0.14)) * (_F32(1.0) + _F32(0.15) * _noise(rng, size, 5))
    base = _rgb(bg)
    sheath_lum = _F32(rng.uniform(0.68, 0.8)) * (
        _F32(1.0) + _F32(0.05) * _noise(rng, size, 16) - _F32(0.12) * _smoothstep(0.8, 1.0, r / _F32(r_sheath))
    )
    base = _over(base, _rgb(sheath_lum) * np.array([1.0, 1.0, 0.97], dtype=_F32), _cover(r - _F32(r_sheath), px))
    fill_lum = _F32(rng.uniform(0.5, 0.6)) * (_F32(1.0) + _F32(0.08) * _fbm(rng, size, [6, 16, 40], [1, 0.6, 0.4]))
    filler = _rgb(fill_lum) * np.array([1.0, 0.98, 0.94], dtype=_F32)
    base = _over(base, filler, _cover(r - _F32(r_fill), px))

    colours = _CABLE_COLOURS * (_F32(1.0) + rng.uniform(-0.06, 0.06, (3, 3)).astype(_F32))
    ins_cov, cu_cov, ins_shade, copper = [], [], [], []
    for k in range(3):
        phi = phi0 + k * _TAU / 3
        kx, ky = cx + d_core * math.cos(phi), cy + d_core * math.sin(phi)
        ex, ey = x - _F32(kx), y - _F32(ky)
        rho = np.hypot(ex, ey)
        ins_cov.append(_cover(rho - _F32(r_core), px))
        cu_cov.append(_cover(rho - _F32(r_cu), px))
        rr = rho / _F32(r_core)
        shade = _F32(0.8) + _F32(0.25) * np.clip(_F32(1.0) - rr * rr, 0.0, 1.0) + _F32(0.1) * (
            (ex + ey) / _F32(r_core)
        ) * _F32(-0.5)
        ins_shade.append(shade.astype(_F32))
        # copper strands on a hexagonal lattice
        lam = r_cu / rng.uniform(2.2, 2.7)
        kk = _F32(_TAU / lam * 2.0 / math.sqrt(3.0))
        rot0 = rng.uniform(0.0, _TAU)
        pat = np.zeros_like(rho)
        for m in range(3):
            t = rot0 + m * math.pi / 3
            pat += np.cos(kk * (ex * _F32(math.cos(t)) + ey * _F32(math.sin(t))))
        strands = np.clip((pat + _F32(1.0)) / _F32(4.0), 0.0, 1.0) ** _F32(0.8)
        edge = _smoothstep(1.0, 0.75, rho / _F32(r_cu))
        cu_lum = (_F32(0.3) + _F32(0.7) * strands) * (_F32(0.6) + _F32(0.4) * edge)
        copper.append(cu_lum[..., None] * np.array([0.9, 0.58, 0.32], dtype=_F32))
    ctx = dict(x=x, y=y, px=px, cx=cx, cy=cy, phi0=phi0, d_core=d_core, r_core=r_core, r_cu=r_cu, base=base,
               colours=colours, ins_cov=ins_cov, cu_cov=cu_cov, ins_shade=ins_shade, copper=copper)
    return _Scene(_cable_paint(ctx, colours, (True, True, True)), ctx)


def _cable_paint(ctx: dict, colours: np.ndarray, present: Sequence[bool]) -> np.ndarray:
    img = ctx["base"]
    for k in range(3):
        if not present[k]:
            continue
        img = _over(img, ctx["ins_shade"][k][..., None] * colours[k], ctx["ins_cov"][k])
        img = _over(img, ctx["copper"][k], ctx["cu_cov"][k])
    return img


def _cable_missing_wire(sc: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    c = sc.ctx
    k = int(rng.integers(3))
    present = [True, True, True]
    present[k] = False
    return _cable_paint(c, c["colours"], present), c["ins_cov"][k]


def _cable_cable_swap(sc: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    c = sc.ctx
    i, j = (int(v) for v in rng.choice(3, size=2, replace=False))
    colours = c["colours"].copy()
    colours[[i, j]] = colours[[j, i]]
    w = np.maximum(c["ins_cov"][i], c["ins_cov"][j])
    return _cable_paint(c, colours, (True, True, True)), w


def _cable_poke_insulation(sc: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    c = sc.ctx
    x, y, px = c["x"], c["y"], c["px"]
    k = int(rng.integers(3))
    phi = c["phi0"] + k * _TAU / 3
    kx, ky = c["cx"] + c["d_core"] * math.cos(phi), c["cy"] + c["d_core"] * math.sin(phi)
    psi = rng.uniform(0.0, _TAU)
    rm = 0.5 * (c["r_core"] + c["r_cu"]) + rng.uniform(-0.15, 0.15) * (c["r_core"] - c["r_cu"])
    px_, py_ = kx + rm * math.cos(psi), ky + rm * math.sin(psi)
    rd = max(rng.uniform(0.024, 0.04), 1.6 * px)
    sd = _blob_sd(rng, x, y, px_, py_, rd, irregular=0.25, aspect=rng.uniform(1.0, 1.5), rot=psi)
    ring = np.clip(c["ins_cov"][k] - c["cu_cov"][k], 0.0, 1.0)
    w = _cover(sd, px) * ring
    la = rng.uniform(0.0, _TAU)
    t = np.clip(((x - _F32(px_)) * _F32(math.cos(la)) + (y - _F32(py_)) * _F32(math.sin(la))) / _F32(rd), -1.0, 1.0)
    if rng.random() < 0.5:
        dent = sc.img * (_F32(rng.uniform(0.5, 0.65)) + _F32(0.15) * t)[..., None]
    else:
        dent = sc.img + (_F32(1.0) - sc.img) * (_F32(rng.uniform(0.3, 0.45)) + _F32(0.12) * t)[..., None]
    return _over(sc.img, dent, w), w


# --- tile -------------------------------------------------------------------------------------------------------


def _tile_scene(size: int, rng: np.random.Generator) -> _Scene:
    base_col = (np.array([0.66, 0.63, 0.58]) * rng.uniform(0.9, 1.08) + rng.uniform(-0.015, 0.015, 3)).astype(_F32)
    lum = _F32(1.0) + _F32(0.1) * _fbm(rng, size, [3, 6, 12, 24, 48], [1.0, 0.7, 0.5, 0.35, 0.25])
    hue = _F32(0.012) * _noise(rng, size, 6)
    img = lum[..., None] * base_col * (_F32(1.0) + hue[..., None] * np.array([1.0, 0.0, -1.0], dtype=_F32))
    img *= (_F32(1.0) + _F32(0.04) * _noise(rng, size, size / 2))[..., None]
    # darker speckles of two sizes and a few light grains
    for cells, thr, depth in ((0.25 * size, 1.5, 0.55), (0.1 * size, 1.9, 0.5)):
        n = _noise(rng, size, cells)
        w = np.clip((n - _F32(thr)) / _F32(0.4), 0.0, 1.0) * _F32(rng.uniform(0.7, 1.0))
        img = _over(img, img * _F32(1.0 - depth), w)
    n = _noise(rng, size, 0.25 * size)
    w = np.clip((n - _F32(2.1)) / _F32(0.4), 0.0, 1.0) * _F32(0.6)
    img = _over(img, np.array([0.92, 0.9, 0.86], dtype=_F32), w)
    x, y = _coords(size)
    return _Scene(img.astype(_F32), dict(x=x, y=y, px=1.0 / size))


def _tile_crack(sc: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    c = sc.ctx
    x, y, px = c["x"], c["y"], c["px"]
    length = rng.uniform(0.3, 0.75)
    start = rng.uniform(0.15, 0.85, 2)
    main = _random_walk(rng, start, rng.uniform(0.0, _TAU), length, 16, 0.3)
    width = max(rng.uniform(0.007, 0.013), px)
    lines = [main]
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.integers(2, 14))
        d = main[k + 1] - main[k]
        base = math.atan2(d[1], d[0]) + rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.1)
        lines.append(_random_walk(rng, main[k], base, length * rng.uniform(0.15, 0.4), 6, 0.35))
    dist_main = _polyline_dist(x, y, lines[:1], width + 2 * px)
    dist_branch = _polyline_dist(x, y, lines[1:], width + 2 * px)
    w = np.maximum(
        _cover(dist_main - _F32(width / 2), px), _cover(dist_branch - _F32(max(0.7 * width, px) / 2), px)
    ) * _F32(rng.uniform(0.8, 1.0))
    return _over(sc.img, sc.img * _F32(rng.uniform(0.2, 0.4)), w), w


def _tile_glue_strip(sc: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    c = sc.ctx
    x, y, px = c["x"], c["y"], c["px"]
    size = x.shape[1]
    length = rng.uniform(0.25, 0.6)
    mid = rng.uniform(0.25, 0.75, 2)
    ang = rng.uniform(0.0, _TAU)
    pts = _random_walk(rng, mid - 0.5 * length * np.array([math.cos(ang), math.sin(ang)]), ang, length, 4, 0.25)
    hw = max(rng.uniform(0.018, 0.045), 1.5 * px)
    dist = _polyline_dist(x, y, [pts], 2 * hw + 2 * px)
    edge = _noise(rng, size, 14)
    sd = dist - _F32(hw) * (_F32(1.0) + _F32(0.3) * edge)
    body = _smoothstep(0.0, -0.6 * hw, sd)  # thicker in the middle, thin at the border
    op = _F32(rng.uniform(0.35, 0.6))
    w = _cover(sd, px) * op * (_F32(0.55) + _F32(0.45) * body) * (_F32(0.9) + _F32(0.1) * _noise(rng, size, 20))
    w = np.clip(w, 0.0, 1.0)
    col = np.array([0.55, 0.4, 0.2], dtype=_F32) * _F32(rng.uniform(0.75, 1.1))
    glue = col + sc.img * _F32(0.25)
    return _over(sc.img, glue, w), w


def _tile_oil(sc: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    c = sc.ctx
    x, y, px = c["x"], c["y"], c["px"]
    ro = max(rng.uniform(0.05, 0.12), 2.0 * px)
    ox, oy = rng.uniform(0.15, 0.85, 2)
    sd = _blob_sd(rng, x, y, ox, oy, ro, irregular=0.3, aspect=rng.uniform(1.0, 1.6), rot=rng.uniform(0, _TAU))
    soft = max(0.25 * ro, 1.5 * px)
    w = _smoothstep(0.5 * soft, -0.5 * soft, sd) * _F32(rng.uniform(0.8, 1.0))
    factor = _F32(rng.uniform(0.6, 0.78)) * np.array([0.97, 0.93, 0.88], dtype=_F32)
    return _over(sc.img, sc.img * factor, w), w


_SCENE_FUNCS: dict[str, Callable[[int, np.random.Generator], _Scene]] = {
    "bottle": _bottle_scene,
    "hazelnut": _hazelnut_scene,
    "cable": _cable_scene,
    "tile": _tile_scene,
}

_DEFECT_FUNCS: dict[tuple[str, str], Callable[[_Scene, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    ("bottle", "broken_large"): _bottle_broken_large,
    ("bottle", "contamination"): _bottle_contamination,
    ("bottle", "broken_small"): _bottle_broken_small,
    ("hazelnut", "crack"): _hazelnut_crack,
    ("hazelnut", "hole"): _hazelnut_hole,
    ("hazelnut", "print"): _hazelnut_print,
    ("cable", "missing_wire"): _cable_missing_wire,
    ("cable", "cable_swap"): _cable_cable_swap,
    ("cable", "poke_insulation"): _cable_poke_insulation,
    ("tile", "crack"): _tile_crack,
    ("tile", "glue_strip"): _tile_glue_strip,
    ("tile", "oil"): _tile_oil,
}

_LOOKS = {
    "bottle": dict(gain=0.1, contrast=0.1, tint=0.05, illum=0.05),
    "hazelnut": dict(gain=0.1, contrast=0.1, tint=0.03, illum=0.08),
    "cable": dict(gain=0.1, contrast=0.08, tint=0.03, illum=0.1),
    "tile": dict(gain=0.08, contrast=0.1, tint=0.03, illum=0.06),
}


def _render(
    category: str, defect: str | None, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Draw one sample from ``rng``.

    Returns ``(normal, defective, mask)``: ``normal`` is the defect-free uint8 (size, size, 3) image; for a defect
    type, ``defective`` is the same image with the defect and ``mask`` the bool (size, size) array of the pixels the
    defect changed (both None when ``defect`` is None).  ``defective`` equals ``normal`` outside ``mask``.
    """
    scene = _SCENE_FUNCS[category](size, rng)
    look = _draw_look(rng, size, **_LOOKS[category])
    normal = _finish(scene.img, look)
    if defect is None:
        return normal, None, None
    draw = _DEFECT_FUNCS[(category, defect)]
    min_pixels = max(3, int(round(4e-4 * size * size)))
    for _ in range(50):
        changed, w = draw(scene, rng)
        delta = np.abs(changed - scene.img).max(axis=2)
        mask = (w > _MIN_WEIGHT) & (delta > _MIN_CHANGE)
        if int(mask.sum()) >= min_pixels:
            break
    else:  # pragma: no cover - the defect parameters are chosen so this does not happen
        raise RuntimeError(f"could not place a {category}/{defect} defect")
    defective = _finish(np.where(mask[..., None], changed, scene.img), look)
    return normal, defective, mask


# ----------------------------------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------------------------------


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ParamsError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if int(value) < minimum:
        raise ParamsError(f"{name} must be an integer >= {minimum}, got {int(value)}")
    return int(value)


def _check_args(
    root: object, categories: object, image_size: object, n_train: object, n_test_good: object,
    n_test_defect: object, seed: object
) -> tuple[Path, list[str], int, int, int, int, int]:
    if not isinstance(root, (str, os.PathLike)) or str(root) == "":
        raise ParamsError(f"root must be a path to a directory, got {root!r}")
    known = ", ".join(CATEGORIES)
    if isinstance(categories, (str, bytes)) or not isinstance(categories, Sequence):
        raise ParamsError(f"categories must be a list of category names (known: {known}), got {categories!r}")
    cats = list(categories)
    if not cats:
        raise ParamsError(f"categories must name at least one category (known: {known})")
    for c in cats:
        if not isinstance(c, str) or c not in _CATEGORY_INDEX:
            raise ParamsError(f"categories: unknown category {c!r}; known categories: {known}")
    dupes = sorted({c for c in cats if cats.count(c) > 1})
    if dupes:
        raise ParamsError(f"categories must not repeat a name, got {', '.join(dupes)} more than once")
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or int(image_size) <= 0 or (
        int(image_size) % 8
    ):
        raise ParamsError(f"image_size must be a positive multiple of 8 (e.g. 128), got {image_size!r}")
    return (
        Path(root),
        cats,
        int(image_size),
        _check_int("n_train", n_train, 2),
        _check_int("n_test_good", n_test_good, 1),
        _check_int("n_test_defect", n_test_defect, 1),
        _check_int("seed", seed, 0),
    )


def _save_rgb(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr).save(path, format="PNG", compress_level=1)


def _save_mask(path: Path, mask: np.ndarray) -> None:
    Image.fromarray(mask.astype(np.uint8) * np.uint8(255)).save(path, format="PNG", compress_level=1)


def generate_dataset(
    root: Path,
    categories: Sequence[str],
    image_size: int,
    n_train: int,
    n_test_good: int,
    n_test_defect: int,
    seed: int,
    *,
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, int]]:
    """Write a synthetic MVTec-AD-style data set to ``root`` and return its image counts.

    ``root`` is replaced as a whole: the data set is written to a temporary sibling directory that is renamed into
    place at the end, so a killed run leaves the previous ``root`` (or nothing) rather than half a data set.
    ``n_test_defect`` is the number of test images per defect type.  ``progress``, if given, is called once per
    category, after it is written, with a short line such as ``"bottle: 99 images"``.

    Returns ``{category: {"train_good": n_train, "test_good": n_test_good, <defect_type>: n_test_defect, ...}}``.
    Raises ParamsError for bad arguments.
    """
    root, cats, size, n_train, n_test_good, n_test_defect, seed = _check_args(
        root, categories, image_size, n_train, n_test_good, n_test_defect, seed
    )
    if progress is not None and not callable(progress):
        raise ParamsError(f"progress must be callable or None, got {progress!r}")
    parent = root.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=parent))
    counts: dict[str, dict[str, int]] = {}
    try:
        for cat in cats:
            ci = _CATEGORY_INDEX[cat]
            cdir = tmp / cat
            jobs: list[tuple[str | None, int, int, Path]] = [
                (None, _SPLIT_TRAIN, n_train, cdir / "train" / "good"),
                (None, _SPLIT_TEST_GOOD, n_test_good, cdir / "test" / "good"),
            ]
            for k, defect in enumerate(_DEFECTS[cat]):
                jobs.append((defect, _SPLIT_FIRST_DEFECT + k, n_test_defect, cdir / "test" / defect))
            counts[cat] = {"train_good": n_train, "test_good": n_test_good}
            for defect, split, n, out_dir in jobs:
                out_dir.mkdir(parents=True)
                digits = max(3, len(str(n - 1)))
                mask_dir = cdir / "ground_truth" / defect if defect is not None else None
                if mask_dir is not None:
                    mask_dir.mkdir(parents=True)
                    counts[cat][defect] = n
                for i in range(n):
                    rng = np.random.default_rng([seed, ci, split, i])
                    normal, defective, mask = _render(cat, defect, size, rng)
                    stem = f"{i:0{digits}d}"
                    if mask_dir is None:
                        _save_rgb(out_dir / f"{stem}.png", normal)
                    else:
                        assert defective is not None and mask is not None
                        _save_rgb(out_dir / f"{stem}.png", defective)
                        _save_mask(mask_dir / f"{stem}_mask.png", mask)
            if progress is not None:
                total = sum(counts[cat].values())
                progress(f"{cat}: {total} images")
        old: Path | None = None
        if root.exists() or root.is_symlink():
            # move the previous data set aside first: os.replace cannot put a directory over a non-empty one
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=parent))
            os.rmdir(old)
            os.replace(root, old)
        try:
            os.replace(tmp, root)
        except BaseException:
            if old is not None:
                os.replace(old, root)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    return counts
