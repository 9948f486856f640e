"""CPU numerics that give the same results on every x86 CPU and for any number of threads (``model.deterministic``).

Where runs of the same params diverged across CPUs (measured: an AMD EPYC against an Intel Xeon with AMX, and on one
Xeon by limiting oneDNN to AVX2 or changing the thread count), the causes were:

* ``model.precision: auto`` picked bf16 autocast on CPUs with native bf16, fp32 on others;
* oneDNN (the default CPU convolution library) picks its kernels, blocking and reduction order per instruction set
  and cache size, and its backward passes reduce over threads;
* PyTorch's own vectorised kernels are compiled per instruction set (AVX2, AVX-512) and dispatched at run time,
  and MKL's matrix products likewise;
* MKL splits a matrix product's inner dimension over threads where its reproducible mode is unavailable (on AMD
  CPUs: it accepts that mode on Intel CPUs only), as in a convolution's weight gradient;
* batch normalisation on channels-last tensors sums per thread.

Training then amplifies the last-bit differences: two runs ended 0.08 image AUROC apart. :func:`configure` routes
every CPU computation of a training process through kernels that do not depend on any of these: fp32, no oneDNN,
PyTorch's AVX2 kernels on every CPU that has AVX2 (``ATEN_CPU_CAPABILITY``), MKL's reproducible AVX2 mode where it
has one (``MKL_CBWR``) and one MKL thread per matrix product, NCHW tensors; and the training loops run their
convolutions in :class:`aead.training.kernels.PinnedKernels`: fixed pieces, one single-threaded matrix product each, on all
threads (``benchmarks/determinism.py`` measures what it costs). Nothing changes on a GPU.
"""

from __future__ import annotations

import os

import torch

from aead.errors import ParamsError
from aead.training.kernels import PinnedKernels, torch_cpu_library

PINNED_CAPABILITY = "AVX2"


def configure(deterministic: bool, device: torch.device) -> None:
    """Pin the CPU numerics when ``deterministic`` and the device is the CPU; call it before any computation (the
    kernel choices are made at the first one). Raises :class:`ParamsError` if they were already made otherwise."""
    if not deterministic or device.type != "cpu":
        return
    os.environ["ATEN_CPU_CAPABILITY"] = PINNED_CAPABILITY.lower()
    os.environ["MKL_CBWR"] = f"{PINNED_CAPABILITY},STRICT"
    torch.backends.mkldnn.enabled = False
    active = torch.backends.cpu.get_cpu_capability()
    if active != PINNED_CAPABILITY and _has_avx2():
        raise ParamsError(f"model.deterministic: PyTorch already chose its {active} kernels before they could be "
                          f"pinned to {PINNED_CAPABILITY}; set ATEN_CPU_CAPABILITY=avx2 in the environment")
    # every matrix product of this thread on one MKL thread, so that none splits its inner dimension over threads
    # (PinnedKernels runs many products at once); PyTorch sets this thread's own count from MKL's at its first use,
    # so that comes first
    torch.get_num_threads()
    torch_cpu_library().MKL_Set_Num_Threads_Local(1)


def training_kernels() -> PinnedKernels | None:
    """The convolution kernels pinned training runs its forward passes in (None where the numerics are not pinned):
    ``with`` it, convolutions take :mod:`aead.training.kernels`' thread-count-independent pieces, on all threads."""
    return PinnedKernels() if is_pinned() else None


def is_pinned() -> bool:
    """Whether the CPU numerics are pinned in this process (oneDNN off, as :func:`configure` leaves it)."""
    return not torch.backends.mkldnn.enabled


def memory_format() -> torch.memory_format:
    """Channels-last (faster with oneDNN and on GPUs) unless the CPU numerics are pinned: batch normalisation of
    channels-last tensors sums per thread, so its results would depend on the thread count."""
    return torch.contiguous_format if is_pinned() else torch.channels_last


def _has_avx2() -> bool:
    """Whether this CPU has AVX2 (read from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as fh:
            return " avx2" in fh.read()
    except OSError:
        return True
