"""Convolutions whose results do not depend on the CPU's thread count, and that still use every core
(``model.deterministic``'s training kernels; :mod:`aead.training.numerics` pins the rest).

A convolution is cut into pieces fixed by its shape: blocks of output rows of one image, or groups of whole small
images, each with about :data:`PIECE_ELEMENTS` unfolded input values. Each piece is one matrix product on one
thread (MKL single-threaded, so it cannot split the product's inner dimension over threads, which MKL does on CPUs
where its reproducible mode is unavailable), and the pieces run in parallel on the calling thread and a pool of
workers. The weight gradient sums the pieces' products in their order. Which thread computes a piece, and how many
threads there are, therefore cannot change a bit of the result; the pieces are the same on every CPU.

* ``conv2d``, stride 1, no dilation, one group, any kernel size and padding: the piece's input unfolded (im2col,
  ``C x kh x kw`` by the piece's pixels) times the ``(C_out, C x kh x kw)`` weight. The input gradient is the same
  convolution of the output gradient with the flipped, transposed weight, so it needs no scatter-add.
* ``conv_transpose2d`` with kernel = stride and no padding (every input pixel writes its own output block): one
  ``(C_out x kh x kw, C_in)`` product per piece.

:class:`PinnedKernels` routes the ``torch.nn.functional`` calls of these shapes with at least
:data:`PIECES_MIN_MACS` multiply-adds per image to them inside its ``with`` block; smaller ones, other convolutions,
other dtypes and other devices keep PyTorch's kernels (with oneDNN off and MKL single-threaded, as
:func:`aead.training.numerics.configure` leaves a training process, those are thread-count independent too).
"""

from __future__ import annotations

import ctypes
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

# Unfolded input values per piece (4 MiB). Part of the numerics (the weight gradient sums per piece, and a product's
# shape can change MKL's blocking): the same on every CPU, never derived from the thread count.
PIECE_ELEMENTS = 1 << 20
# Multiply-adds per image below which a convolution keeps PyTorch's own kernel (oneDNN off: im2col and one product per
# image, in parallel over images): forward and backward of 8 images, 2 threads, PyTorch's against the pieces: 0.45x
# the time at 64 px 8 -> 8 channels, 0.63x at 32 px 64 -> 32, 1.1x at 32 px 128 -> 128, 2.1x at 256 px 64 -> 32
# (docs/measurements.md). Chosen by shape, so the same everywhere.
PIECES_MIN_MACS = 1 << 25
SMALL_UNFOLD = 1 << 18  # unfolded values up to which a piece is unfolded in one copy (how only: same values)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class _Pool:
    """Runs a list of pieces on ``threads`` threads, the calling thread among them, each single-threaded (MKL and
    PyTorch's own loops) while it computes a piece, whatever the process's thread count."""

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads)
        self.executor: ThreadPoolExecutor | None = None
        self.torch_cpu, self.omp = _libraries()
        self.local = threading.local()

    def scratch(self, slot: int, shape: Sequence[int]) -> Tensor:
        """A float32 buffer of ``shape`` that the calling thread reuses (one per ``slot``, for what a piece needs
        at once): a fresh allocation of this size costs a page fault per 4 KiB, more than filling it."""
        buffers = self.local.__dict__.setdefault("buffers", {})
        numel = math.prod(shape)
        if slot not in buffers or buffers[slot].numel() < numel:
            buffers[slot] = torch.empty(numel, dtype=torch.float32)
        return buffers[slot][:numel].view(*shape)

    def map(self, fn: Callable[[Any], Any], items: list) -> list:
        """``fn`` of each item, in order. The items are cut into one run of consecutive items per thread
        (dispatching costs more than a small piece); which thread runs which run cannot change a result."""
        step = -(-len(items) // self.threads)
        parts = [items[i : i + step] for i in range(0, len(items), step)]
        if len(parts) > 1 and self.executor is None:
            self.executor = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="aead-kernel",
                                               initializer=_single_threaded, initargs=(self.torch_cpu, self.omp))

        inference = torch.is_inference_mode_enabled()

        def task(part: list) -> list:
            # grad and inference mode are per thread: a worker takes the caller's, without recording its products
            with torch.inference_mode(inference), torch.no_grad():
                return [fn(item) for item in part]

        others = [self.executor.submit(task, part) for part in parts[1:]] if len(parts) > 1 else []
        before = _single_threaded(self.torch_cpu, self.omp)
        try:
            results = [fn(item) for item in parts[0]]
        finally:
            _set_threads(self.torch_cpu, self.omp, *before)
        for future in others:
            results.extend(future.result())
        return results

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()
            self.executor = None


def torch_cpu_library() -> ctypes.CDLL:
    """torch's CPU library, which holds (and exports) MKL."""
    return ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))


def _libraries() -> tuple[Any, Any]:
    """(torch's CPU library; the OpenMP runtime PyTorch loaded, or None)."""
    with open("/proc/self/maps") as fh:
        omp = next((line.split()[-1] for line in fh if "libgomp" in line or "libiomp" in line), None)
    return torch_cpu_library(), (ctypes.CDLL(omp) if omp else None)


def _set_threads(torch_cpu: Any, omp: Any, mkl_threads: int, omp_threads: int) -> None:
    torch_cpu.MKL_Set_Num_Threads_Local(ctypes.c_int(mkl_threads))
    if omp is not None:
        omp.omp_set_num_threads(ctypes.c_int(omp_threads))


def _single_threaded(torch_cpu: Any, omp: Any) -> tuple[int, int]:
    """Limit the calling thread to one OpenMP and one MKL thread (other threads keep theirs); returns its previous
    (MKL, OpenMP) counts."""
    omp_threads = torch.get_num_threads()  # also lets PyTorch set a new thread's counts (at its first use) first
    mkl_threads = torch_cpu.MKL_Set_Num_Threads_Local(ctypes.c_int(1))
    if omp is not None:
        omp.omp_set_num_threads(ctypes.c_int(1))
    return mkl_threads, omp_threads


Piece = tuple[int, int, int, int]  # images i0..i1, output rows r0..r1 (all rows when i1 - i0 > 1)


def pieces(n: int, height: int, width: int, depth: int) -> list[Piece]:
    """The pieces of ``n`` images of ``height`` x ``width`` output pixels whose unfolded input has ``depth`` rows:
    blocks of rows of about PIECE_ELEMENTS / depth pixels, or groups of whole images where one image has fewer. A
    function of the shapes alone."""
    pixels = max(1, PIECE_ELEMENTS // depth)
    if height * width >= pixels:
        rows = max(1, pixels // width)
        return [(i, i + 1, r, min(r + rows, height)) for i in range(n) for r in range(0, height, rows)]
    group = pixels // (height * width)
    return [(i, min(i + group, n), 0, height) for i in range(0, n, group)]


def _most_pixels(parts: list[Piece], width: int) -> int:
    return max((i1 - i0) * (r1 - r0) * width for i0, i1, r0, r1 in parts)


def _columns(pool: _Pool, t: Tensor, piece: Piece, width: int, slot: int = 0) -> Tensor:
    """(C, pixels) of NCHW ``t`` (``width`` columns) under a piece: a view for one image, else a copy in scratch
    ``slot``."""
    i0, i1, r0, r1 = piece
    c = t.shape[1]
    if i1 - i0 == 1:
        return t[i0].view(c, -1)[:, r0 * width : r1 * width]
    buffer = pool.scratch(slot, (c, i1 - i0, t.shape[2] * t.shape[3]))
    buffer.copy_(t[i0:i1].reshape(i1 - i0, c, -1).transpose(0, 1))
    return buffer.view(c, -1)


def _product(pool: _Pool, out: Tensor, piece: Piece, width: int, a: Tensor, b: Tensor,
             bias: Tensor | None = None) -> None:
    """``a @ b`` (+ ``bias`` per row) into the piece's pixels of NCHW ``out``: straight into it for one image."""
    i0, i1, r0, r1 = piece
    c = out.shape[1]
    if i1 - i0 == 1:
        target = out[i0].view(c, -1)[:, r0 * width : r1 * width]
    else:
        target = pool.scratch(1, (c, b.shape[1]))
    if bias is None:
        torch.mm(a, b, out=target)
    else:
        torch.addmm(bias[:, None], a, b, out=target)
    if i1 - i0 > 1:
        out[i0:i1].view(i1 - i0, c, -1).transpose(0, 1).copy_(target.view(c, i1 - i0, -1))


def _unfold(pool: _Pool, x_pad: Tensor, piece: Piece, kh: int, kw: int, width: int) -> Tensor:
    """(C x kh x kw, pixels): the padded input under a piece's output pixels, unfolded (im2col) into scratch."""
    if kh == kw == 1:
        return _columns(pool, x_pad, piece, width)
    i0, i1, r0, r1 = piece
    c = x_pad.shape[1]
    buffer = pool.scratch(0, (c, kh, kw, i1 - i0, r1 - r0, width))
    rows = x_pad[i0:i1, :, r0 : r1 + kh - 1, : width + kw - 1]
    if buffer.numel() <= SMALL_UNFOLD:  # one copy of the 6-d view of all taps: fewer calls for a small piece
        buffer.copy_(rows.unfold(2, kh, 1).unfold(3, kw, 1).permute(1, 4, 5, 0, 2, 3))
    else:  # one strided copy per tap: 8x faster than the 6-d view for a 75 MB unfolded image
        for dy in range(kh):
            for dx in range(kw):
                buffer[:, dy, dx].copy_(rows[:, :, dy : dy + r1 - r0, dx : dx + width].transpose(0, 1))
    return buffer.view(c * kh * kw, -1)


def _padded(x: Tensor, padding: tuple[int, int]) -> Tensor:
    ph, pw = padding
    return (F.pad(x, (pw, pw, ph, ph)) if ph or pw else x).contiguous()


def conv2d_forward(pool: _Pool, x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int]) -> Tensor:
    """Stride-1 convolution of NCHW ``x``, one matrix product per piece."""
    n, _, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    x_pad = _padded(x, padding)
    oh, ow = h + 2 * padding[0] - kh + 1, w + 2 * padding[1] - kw + 1
    out = torch.empty(n, c_out, oh, ow, dtype=x.dtype)
    w2 = weight.reshape(c_out, -1).contiguous()

    def piece(item: Piece) -> None:
        _product(pool, out, item, ow, w2, _unfold(pool, x_pad, item, kh, kw, ow), bias)

    pool.map(piece, pieces(n, oh, ow, w2.shape[1]))
    return out


def conv2d_weight_grad(pool: _Pool, x: Tensor, grad: Tensor, weight_shape: torch.Size, padding: tuple[int, int],
                       with_bias: bool) -> tuple[Tensor, Tensor | None]:
    """The weight (and bias) gradient: per piece, output gradient times the unfolded input (and times ones);
    summed in the pieces' order."""
    n, _, oh, ow = grad.shape
    _, _, kh, kw = weight_shape
    x_pad = _padded(x, padding)
    parts = pieces(n, oh, ow, x.shape[1] * kh * kw)
    ones = torch.ones(_most_pixels(parts, ow), dtype=grad.dtype)

    def piece(item: Piece) -> tuple[Tensor, Tensor | None]:
        cols = _unfold(pool, x_pad, item, kh, kw, ow)
        g = _columns(pool, grad, item, ow, slot=1)
        weight = torch.mm(g, cols.t())
        # the bias as a matrix-vector product: MKL's, single-threaded like the others
        return weight, torch.mv(g, ones[: g.shape[1]]) if with_bias else None

    results = pool.map(piece, parts)
    grad_b = _ordered_sum([b for _, b in results]) if with_bias else None
    return _ordered_sum([w for w, _ in results]).view(weight_shape), grad_b


def _ordered_sum(parts: list[Tensor]) -> Tensor:
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, int],
                pool: _Pool) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.pool, ctx.has_bias = padding, pool, bias is not None
        return conv2d_forward(pool, x, weight, bias, padding)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        pool, (ph, pw) = ctx.pool, ctx.padding
        kh, kw = weight.shape[2:]
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            flipped = weight.flip(2, 3).transpose(0, 1)
            grad_x = conv2d_forward(pool, grad, flipped, None, (kh - 1 - ph, kw - 1 - pw))
        if ctx.needs_input_grad[1] or ctx.has_bias and ctx.needs_input_grad[2]:
            grad_w, grad_b = conv2d_weight_grad(pool, x, grad, weight.shape, (ph, pw), ctx.has_bias)
        return grad_x, grad_w, grad_b, None, None


def _output_blocks(t: Tensor, kh: int, kw: int, piece: Piece) -> Tensor:
    """(images, C_out, rows, kh, w, kw): the output blocks of a transposed convolution's input piece, a view."""
    n, c, oh, ow = t.shape
    i0, i1, r0, r1 = piece
    return t.view(n, c, oh // kh, kh, ow // kw, kw)[i0:i1, :, r0:r1]


def _block_columns(pool: _Pool, t: Tensor, kh: int, kw: int, piece: Piece) -> Tensor:
    """(C_out x kh x kw, pixels): the output blocks of an input piece, one column per input pixel (scratch 0)."""
    blocks = _output_blocks(t, kh, kw, piece)
    images, c, rows, _, w, _ = blocks.shape
    buffer = pool.scratch(0, (c, kh, kw, images, rows, w))
    buffer.copy_(blocks.permute(1, 3, 5, 0, 2, 4))
    return buffer.view(c * kh * kw, -1)


def conv_transpose_forward(pool: _Pool, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Transposed convolution with kernel = stride: each input pixel's (C_out, kh, kw) output block is one column
    of ``weight^T x``."""
    n, c_in, h, w = x.shape
    _, c_out, kh, kw = weight.shape
    wt = weight.permute(1, 2, 3, 0).reshape(c_out * kh * kw, c_in).contiguous()
    out = torch.empty(n, c_out, h * kh, w * kw, dtype=x.dtype)
    x = x.contiguous()

    def piece(item: Piece) -> None:
        target = _output_blocks(out, kh, kw, item)
        images, _, rows, *_ = target.shape
        cols = _columns(pool, x, item, w)
        y = torch.mm(wt, cols, out=pool.scratch(1, (wt.shape[0], cols.shape[1])))
        target.copy_(y.view(c_out, kh, kw, images, rows, w).permute(3, 0, 4, 1, 5, 2))
        if bias is not None:
            target.add_(bias.view(c_out, 1, 1, 1, 1))

    pool.map(piece, pieces(n, h, w, c_in))
    return out


class _ConvTranspose2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, pool: _Pool) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.pool, ctx.has_bias = pool, bias is not None
        return conv_transpose_forward(pool, x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        n, c_in, h, w = x.shape
        _, c_out, kh, kw = weight.shape
        grad = grad.contiguous()
        x = x.contiguous()
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = ctx.has_bias and ctx.needs_input_grad[2]
        grad_x = torch.empty_like(x) if want_x else None
        wt = weight.reshape(c_in, c_out * kh * kw).contiguous()
        parts = pieces(n, h, w, c_out * kh * kw)
        ones = torch.ones(kh * kw * _most_pixels(parts, w), dtype=grad.dtype)

        def piece(item: Piece) -> tuple[Tensor | None, Tensor | None]:
            cols = _block_columns(ctx.pool, grad, kh, kw, item)
            if want_x:
                _product(ctx.pool, grad_x, item, w, wt, cols)
            grad_w = torch.mm(_columns(ctx.pool, x, item, w, slot=2), cols.t()) if want_w else None
            grad_b = torch.mv(cols.view(c_out, -1), ones[: cols.numel() // c_out]) if want_b else None
            return grad_w, grad_b

        results = ctx.pool.map(piece, parts)
        grad_w = _ordered_sum([p for p, _ in results]).view(weight.shape) if want_w else None
        grad_b = _ordered_sum([b for _, b in results]) if want_b else None
        return grad_x, grad_w, grad_b, None


def _plain(t: Tensor | None) -> bool:
    return t is None or (t.device.type == "cpu" and t.dtype == torch.float32)


_CONV2D = {torch.conv2d, F.conv2d}
_CONV_TRANSPOSE2D = {torch.conv_transpose2d, F.conv_transpose2d}


class PinnedKernels(TorchFunctionMode):
    """Inside ``with PinnedKernels(threads):``, fp32 CPU convolutions of the shapes above run on
    :mod:`aead.training.kernels`' thread-count-independent pieces, on ``threads`` threads (default: torch's count).
    Reusable; :meth:`close` stops its threads."""

    def __init__(self, threads: int | None = None) -> None:
        super().__init__()
        self.pool = _Pool(threads or torch.get_num_threads())

    def close(self) -> None:
        self.pool.close()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _CONV2D:
            call = _conv2d_call(*args, **kwargs)
            if call is not None:
                x, weight, bias, padding = call
                return _Conv2d.apply(x, weight, bias, padding, self.pool)
        elif func in _CONV_TRANSPOSE2D:
            call = _conv_transpose_call(*args, **kwargs)
            if call is not None:
                return _ConvTranspose2d.apply(*call, self.pool)
        return func(*args, **kwargs)


def _conv2d_call(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1) -> tuple | None:
    """(x, weight, bias, padding) where the pieces compute this call, else None."""
    if isinstance(padding, str) or groups != 1 or _pair(stride) != (1, 1) or _pair(dilation) != (1, 1):
        return None
    if input.dim() != 4 or not all(_plain(t) for t in (input, weight, bias)):
        return None
    if input.shape[2] * input.shape[3] * weight.numel() < PIECES_MIN_MACS:
        return None
    return input, weight, bias, _pair(padding)


def _conv_transpose_call(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1,
                         padding: Any = 0, output_padding: Any = 0, groups: int = 1, dilation: Any = 1
                         ) -> tuple | None:
    """(x, weight, bias) where the pieces compute this call (kernel = stride, nothing else), else None."""
    if groups != 1 or _pair(padding) != (0, 0) or _pair(output_padding) != (0, 0) or _pair(dilation) != (1, 1):
        return None
    if input.dim() != 4 or _pair(stride) != tuple(weight.shape[2:]) or not all(_plain(t) for t in (input, weight, bias)):
        return None
    if input.shape[2] * input.shape[3] * weight.numel() < PIECES_MIN_MACS:
        return None
    return input, weight, bias
