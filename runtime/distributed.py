"""Tensor/pipeline-parallel context of the current process.

The runtime asks this module for its tp rank/size and for collectives. With world size 1 (the default)
every collective is the identity, so single-process code pays nothing. Multi-process runs initialise a
torch.distributed process group (NCCL on GPUs, gloo on CPUs) before the model is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelContext:
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    tp_group: object | None = None  # torch.distributed ProcessGroup of this rank's TP peers
    ep_size: int = 1  # 1, or tp_size: a mixture of experts' experts are split whole over the TP group (Mapping.ep)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


_CONTEXT = ParallelContext()


def set_parallel_context(ctx: ParallelContext) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def get_parallel_context() -> ParallelContext:
    return _CONTEXT


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum partial results of row-parallel layers across the TP group (in place)."""
    ctx = _CONTEXT
    if ctx.tp_size == 1:
        return x
    dist.all_reduce(x, group=ctx.tp_group)
    return x


def tp_all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each TP rank's slice of the last dimension (vocab-parallel logits)."""
    ctx = _CONTEXT
    if ctx.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(ctx.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=ctx.tp_group)
    return torch.cat(parts, dim=-1)
