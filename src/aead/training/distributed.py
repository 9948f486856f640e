"""Data-parallel training and bank building under ``torchrun``: who am I, and the few collectives they need.

``torchrun --nproc-per-node N stages/train.py ...`` starts N processes with ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE`` in their environment (multi-node: the usual ``--nnodes``/``--rdzv-*`` flags). Without those
variables training runs in one process and nothing here talks to a process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from aead.errors import ParamsError


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: rank 0 of 1 when not launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and logs."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE = DistContext()


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ParamsError(f"environment variable {name}={value!r}: expected an integer (set by torchrun)") from None


def init_distributed(device: torch.device) -> DistContext:
    """Join the process group torchrun set up (NCCL on CUDA, gloo on CPU); ``SINGLE`` when not under torchrun.

    On CUDA each process takes the GPU of its ``LOCAL_RANK``."""
    if "WORLD_SIZE" not in os.environ or _env_int("WORLD_SIZE") <= 1:
        return SINGLE
    ctx = DistContext(rank=_env_int("RANK"), world_size=_env_int("WORLD_SIZE"), local_rank=_env_int("LOCAL_RANK"))
    if device.type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return ctx


def process_device(device: torch.device, ctx: DistContext) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` for distributed CUDA training, else ``device``."""
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum of ``t`` over all processes (``t`` itself in a single process)."""
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _collective_device() -> torch.device:
    """Where the tensors of a collective must be: the process's GPU under NCCL, else the CPU (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(rows: torch.Tensor, ctx: DistContext) -> torch.Tensor | None:
    """The rows (N_r, C) of every process, concatenated in rank order on the CPU of the main process; None on the
    others; ``rows`` itself in a single process. Every process's rows must have the same width C."""
    if not ctx.enabled:
        return rows
    device = _collective_device()
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(ctx.world_size)]
    dist.all_gather(counts, torch.tensor([rows.shape[0]], device=device))
    sizes = [int(c) for c in counts]
    padded = torch.zeros(max(sizes), rows.shape[1], dtype=rows.dtype, device=device)
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in sizes] if ctx.is_main else None
    dist.gather(padded, parts, dst=0)
    if parts is None:
        return None
    return torch.cat([part[:n].cpu() for part, n in zip(parts, sizes)])


def barrier(ctx: DistContext) -> None:
    """Wait for every process (no-op in a single process)."""
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    """Leave the process group."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def shard(start: int, stop: int, ctx: DistContext) -> tuple[int, int]:
    """This process's contiguous part of positions ``start:stop`` of a global batch (sizes differ by at most 1)."""
    n = stop - start
    base, extra = divmod(n, ctx.world_size)
    lo = start + ctx.rank * base + min(ctx.rank, extra)
    return lo, lo + base + (1 if ctx.rank < extra else 0)
