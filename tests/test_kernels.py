"""The pinned training convolutions (aead.training.kernels): the same values as PyTorch's, bit for bit the same for any
number of threads, and used only where they should be."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from aead.training import kernels
from aead.training.kernels import PinnedKernels, _Conv2d, _ConvTranspose2d, _Pool, pieces

CONV_CASES = [  # x shape, weight shape, bias, padding: several pieces per image, whole-image groups, odd sizes
    ((2, 5, 37, 300), (7, 5, 3, 3), True, (1, 1)),
    ((9, 6, 8, 8), (4, 6, 3, 3), False, (1, 1)),
    ((3, 16, 20, 20), (3, 16, 1, 1), True, (0, 0)),
    ((3, 1, 20, 30), (1, 1, 11, 1), False, (0, 0)),
    ((2, 5, 9, 10), (7, 5, 1, 5), True, (0, 2)),
]


def _conv(pool: _Pool, case, seed: int = 0):
    """Output and gradients of x, weight (and bias) through the pieces, and through F.conv2d."""
    x_shape, w_shape, with_bias, padding = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*x_shape, generator=gen, requires_grad=True)
    w = torch.randn(*w_shape, generator=gen, requires_grad=True)
    b = torch.randn(w_shape[0], generator=gen, requires_grad=True) if with_bias else None
    leaves = [t for t in (x, w, b) if t is not None]
    out = _Conv2d.apply(x, w, b, padding, pool)
    grad = torch.randn(out.shape, generator=gen)
    ours = [out.detach(), *torch.autograd.grad(out, leaves, grad)]
    ref_out = F.conv2d(x, w, b, padding=padding)
    return ours, [ref_out.detach(), *torch.autograd.grad(ref_out, leaves, grad)]


def _transpose(pool: _Pool, x_shape, w_shape, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*x_shape, generator=gen, requires_grad=True)
    w = torch.randn(*w_shape, generator=gen, requires_grad=True)
    b = torch.randn(w_shape[1], generator=gen, requires_grad=True)
    out = _ConvTranspose2d.apply(x, w, b, pool)
    grad = torch.randn(out.shape, generator=gen)
    ours = [out.detach(), *torch.autograd.grad(out, (x, w, b), grad)]
    ref = F.conv_transpose2d(x, w, b, stride=w_shape[2:])
    return ours, [ref.detach(), *torch.autograd.grad(ref, (x, w, b), grad)]


def _close(ours, ref):
    for a, b in zip(ours, ref, strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 1e-5 * max(1.0, float(b.abs().max())), (a - b).abs().max()


@pytest.mark.parametrize("case", CONV_CASES)
def test_convolution_pieces_compute_what_pytorch_computes(case):
    pool = _Pool(2)
    try:
        _close(*_conv(pool, case))
    finally:
        pool.close()


@pytest.mark.parametrize("x_shape", [(2, 16, 20, 30), (70, 16, 4, 5)])
def test_transposed_convolution_pieces_compute_what_pytorch_computes(x_shape):
    pool = _Pool(2)
    try:
        _close(*_transpose(pool, x_shape, (16, 8, 2, 2)))
    finally:
        pool.close()


def test_results_are_the_same_bits_for_any_thread_count(monkeypatch):
    """Small pieces, so that every case has many, and weight gradients sum many partial products."""
    monkeypatch.setattr(kernels, "PIECE_ELEMENTS", 1 << 12)
    results = {}
    for threads in (1, 2, 3):
        pool = _Pool(threads)
        try:
            results[threads] = [_conv(pool, case)[0] for case in CONV_CASES]
            results[threads].append(_transpose(pool, (5, 16, 20, 30), (16, 8, 2, 2))[0])
        finally:
            pool.close()
    assert len(pieces(9, 8, 8, 54 * 7)) > 1 and len(pieces(2, 37, 300, 45)) > 10
    for threads in (2, 3):
        for ours, single in zip(results[threads], results[1], strict=True):
            assert all(torch.equal(a, b) for a, b in zip(ours, single, strict=True))


def test_pieces_depend_on_the_shapes_only():
    parts = pieces(3, 256, 256, 288)
    pixels = kernels.PIECE_ELEMENTS // 288
    assert parts[0] == (0, 1, 0, pixels // 256) and parts[-1][:2] == (2, 3) and parts[-1][3] == 256
    assert pieces(8, 8, 8, 576) == [(0, 8, 0, 8)]  # small images: groups of whole images
    assert sum((i1 - i0) * (r1 - r0) for i0, i1, r0, r1 in pieces(5, 33, 47, 100)) == 5 * 33


def test_the_mode_routes_large_plain_convolutions_to_the_pieces_only():
    """Large stride-1 convolutions take the pieces; small ones, strided, grouped or non-fp32 ones keep PyTorch's."""
    calls = []

    class Counting(PinnedKernels):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = super().__torch_function__(func, types, args, kwargs)
            if func in kernels._CONV2D | kernels._CONV_TRANSPOSE2D:
                calls.append(out.grad_fn is not None and type(out.grad_fn).__name__.startswith(("_Conv", "_ConvT")))
            return out

    big = torch.randn(1, 32, 128, 128, requires_grad=True)
    w = torch.randn(32, 32, 3, 3)
    small = torch.randn(1, 4, 16, 16, requires_grad=True)
    mode = Counting(2)
    try:
        with mode:
            y = F.conv2d(big, w, padding=1)
            F.conv2d(small, torch.randn(4, 4, 3, 3), padding=1)
            F.conv2d(big, w, padding=1, stride=2)
            F.conv2d(big, torch.randn(32, 1, 3, 3), padding=1, groups=32)
            F.conv_transpose2d(big, torch.randn(32, 16, 2, 2), stride=2)
    finally:
        mode.close()
    assert calls == [True, False, False, False, True]
    _close([y.detach()], [F.conv2d(big, w, padding=1).detach()])


def test_the_mode_works_under_inference_mode():
    """The validation loss runs under torch.inference_mode: the workers must write into its tensors."""
    x, w = torch.randn(4, 32, 96, 96), torch.randn(32, 32, 3, 3)
    mode = PinnedKernels(2)
    try:
        with torch.inference_mode(), mode:
            y = F.conv2d(x, w, padding=1)
    finally:
        mode.close()
    _close([y], [F.conv2d(x, w, padding=1)])


TRAIN_SCRIPT = """
import dataclasses, hashlib, numpy as np, torch
from aead.params import load_params
from aead.models.torch_model import build_model
from aead.training.loops import setup_compute, train_autoencoder
params = load_params("params.yaml")
model = dataclasses.replace(params.model, epochs=1, patience=2, batch_size=4, deterministic=True)
device = setup_compute(model, training=True)
images = (np.random.default_rng(0).random((8, 128, 128, 3)) * 255).astype(np.uint8)
result = train_autoencoder(build_model("multiscale", 16, seed=0), images, images[:2], model, device, log=lambda m: None)
digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in result.state_dict.values()))
print(torch.get_num_threads(), digest.hexdigest())
"""


def test_pinned_training_gives_the_same_weights_on_one_and_two_threads(repo_root):
    """Training at a size where both the pieces (128 px, width 16) and PyTorch's own convolutions (the deeper, smaller
    layers) run, in fresh processes as the stages do: 1 thread and 2 threads give the same weights."""
    env_base = {k: v for k, v in __import__("os").environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    digests = {}
    for threads in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", TRAIN_SCRIPT], cwd=repo_root, capture_output=True, text=True,
                             check=True, env={**env_base, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
        reported, digest = out.stdout.split()
        assert reported == threads
        digests[threads] = digest
    assert digests["1"] == digests["2"]
