"""CPU numerics that give the same results on every x86 CPU and for any number of threads (``model.deterministic``).

Where runs of the same params diverged across CPUs (measured: an AMD EPYC against an Intel Xeon with AMX, and on one
Xeon by limiting oneDNN to AVX2 or changing the thread count), the causes were:

* ``model.precision: auto`` picked bf16 autocast on CPUs with native bf16, fp32 on others;
* oneDNN (the default CPU convolution library) picks its kernels, blocking and reduction order per instruction set
  and cache size, and its backward passes reduce over threads;
* PyTorch's own vectorised kernels are compiled per instruction set (AVX2, AVX-512) and dispatched at run time,
  and MKL's matrix products likewise;
* batch normalisation on channels-last tensors sums per thread.

Training then amplifies the last-bit differences: two runs ended 0.08 image AUROC apart. :func:`configure` routes
every CPU computation through kernels that do not depend on any of these: fp32, convolutions by PyTorch's own
im2col + matrix product instead of oneDNN, PyTorch's AVX2 kernels on every CPU that has AVX2
(``ATEN_CPU_CAPABILITY``), MKL's conditional numerical reproducibility for AVX2 in its strict, thread-independent
mode (``MKL_CBWR``), and NCHW tensors. It costs speed (``benchmarks/determinism.py`` measures it) and changes nothing
on a GPU.

MKL honours that mode on Intel CPUs only: on an AMD EPYC it reports its ``AUTO`` branch instead, and its matrix
products with a long inner dimension (the weight gradients of 1x1 and transposed convolutions of the width-4 test
models) then split that dimension over threads, so 1 and 2 threads gave other weights. Where MKL does not confirm
the pinned branch, :func:`configure` runs the process on one thread (:func:`mkl_branch_pinned`).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from aead.errors import ParamsError

PINNED_CAPABILITY = "AVX2"
MKL_CBWR_BRANCH = 1  # mkl_cbwr_get's option that asks for the active branch
MKL_CBWR_AVX2 = 10  # the value it answers when the AVX2 branch is active (MKL_CBWR_AUTO is 2)


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
    if not mkl_branch_pinned():
        torch.set_num_threads(1)


def mkl_branch_pinned() -> bool:
    """Whether MKL runs the pinned AVX2 branch of its reproducible mode, as it reports it (``mkl_cbwr_get``, which
    torch's library exports as ``mkl_serv_cbwr_get``). False where it fell back to another branch, e.g. on AMD CPUs,
    and where it cannot be asked."""
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        return lib.mkl_serv_cbwr_get(ctypes.c_int(MKL_CBWR_BRANCH)) & 0xFFFF == MKL_CBWR_AVX2  # without STRICT's bit
    except (OSError, AttributeError):
        return False


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
