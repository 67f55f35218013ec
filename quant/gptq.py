"""GPTQ for llmx's int4 group-wise format: Hessian-based error compensation, one Linear at a time.

For a Linear with weight W [N out, K in] and calibration inputs X [tokens, K], GPTQ quantizes the input
columns of W one after another and, after each, moves the column's rounding error onto the columns not
yet quantized, weighted by the inverse of H = X^T X (damped), so that X W^T changes as little as
possible. What this file decides, and why:

- Scales follow the weights being quantized: without activation order a group's scale (amax / 7) is
  taken when GPTQ reaches the group's first column, from the weights as the errors of earlier columns
  have moved them. Scales fixed from the original weights beforehand (ModelOpt 0.47's GPTQ) clip the
  compensated weights that leave their group's range.
- Activation order (`act_order`) quantizes the columns with the largest H diagonal first. llmx's format
  has contiguous groups (no per-column group index), so with it the group scales are fixed from the
  original weights before the pass ("static groups").
- The Cholesky factor of H^-1 is computed in float64: H of a few thousand features in float32 can lose
  positive definiteness after damping by 1% of its mean diagonal.
- Within a decoder layer the Linears are quantized in the order the layer runs them (q/k/v, o, gate/up,
  down: `STAGES`), each on inputs computed by the already-quantized Linears before it ("true sequential").

Pure torch: llmx.quant.modelopt runs it inside ModelOpt's layerwise pass (each decoder layer calibrated
on the outputs of the already-quantized layers before it).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch

from llmx.common.errors import LlmxError

INT4_MAX = 7  # symmetric int4: scale = amax / 7, codes in [-8, 7] (llmx.formats.weights.int4)
# Linears of a decoder layer, by the last part of their name, in the order the layer computes them.
STAGES = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


@dataclass(frozen=True)
class GptqSettings:
    """The GPTQ settings `llmx quantize` exposes (`--gptq-damp`, `--gptq-block-size`, `--gptq-act-order`)."""

    damp: float = 0.01  # added to H's diagonal, as a fraction of its mean diagonal
    block_size: int = 128  # columns updated together (lazy batch updates); a multiple of the group size
    act_order: bool = False  # columns in decreasing H diagonal, with scales fixed from the original weights

    def check(self, group_size: int) -> "GptqSettings":
        """Self, or one sentence naming the option that is out of range."""
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 < self.damp <= 1:
            raise LlmxError(f"--gptq-damp {self.damp!r} must be a number in (0, 1]: the fraction of the Hessian's "
                            "mean diagonal added to it (typically 0.01).")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0 \
                or self.block_size % group_size:
            raise LlmxError(f"--gptq-block-size {self.block_size!r} must be a positive multiple of the group size "
                            f"{group_size} (typically 128).")
        if not isinstance(self.act_order, bool):
            raise LlmxError(f"--gptq-act-order must be true or false, got {self.act_order!r}.")
        return self


class HessianAccumulator:
    """Sum of x^T x over the rows of every input a Linear sees, in float64 ([K, K])."""

    def __init__(self, in_features: int):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        self.sum += (flat.T @ flat).double().cpu()
        self.rows += flat.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.rows == 0:
            raise ValueError("GPTQ saw no calibration inputs for this Linear")
        return self.sum / self.rows


def stage_of(name: str) -> int:
    """The position of a Linear (by module name) in STAGES; any other Linear comes last."""
    last = name.rsplit(".", 1)[-1]
    return next((i for i, stage in enumerate(STAGES) if last in stage), len(STAGES))


def _scale(amax: torch.Tensor) -> torch.Tensor:
    return torch.where(amax > 0, amax / INT4_MAX, torch.ones_like(amax))


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, float64."""
    h = hessian.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    lower = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, *, group_size: int,
                  settings: GptqSettings = GptqSettings()) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of `weight` [N, K] under `hessian` [K, K] -> (dequantized weight float32 [N, K], amax [N, K/group]).

    The dequantized weight is exactly codes * amax / 7 per group, so quantizing it again with that amax
    (llmx.formats.weights.int4.quantize_int4) gives back the codes GPTQ chose.
    """
    n, k = weight.shape
    if k % group_size or settings.block_size % group_size:
        raise ValueError(f"group size {group_size} must divide K {k} and the block size {settings.block_size}")
    w = weight.float().clone()
    h = hessian.to(device=w.device, dtype=torch.float64, copy=True)
    dead = h.diagonal() == 0  # inputs that were always zero: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    groups = k // group_size
    amax = torch.zeros(n, groups, device=w.device)
    if settings.act_order:
        amax = w.abs().reshape(n, groups, group_size).amax(dim=-1)
        order = torch.argsort(h.diagonal(), descending=True)
    else:
        order = torch.arange(k, device=w.device)
    w, h = w[:, order], h[order][:, order]
    hinv = _inverse_hessian_factor(h, settings.damp).float()
    out = torch.zeros_like(w)
    for start in range(0, k, settings.block_size):
        end = min(start + settings.block_size, k)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        with _one_thread():
            _quantize_block(block, errors, out[:, start:end], hinv[start:end, start:end], order[start:end], amax,
                            group_size, settings.act_order)
        w[:, end:] -= errors @ hinv[start:end, end:]
    return out[:, torch.argsort(order)], amax


def _quantize_block(block: torch.Tensor, errors: torch.Tensor, out: torch.Tensor, hinv: torch.Tensor,
                    columns: torch.Tensor, amax: torch.Tensor, group_size: int, act_order: bool) -> None:
    """Quantize the columns of one block in order, in place: `out` gets the dequantized columns, `errors` the
    scaled rounding errors the caller moves onto the later blocks; `amax` gets each group's when it starts."""
    for i, column in enumerate(columns.tolist()):
        group = column // group_size
        if not act_order and column % group_size == 0:
            amax[:, group] = block[:, i:i + group_size].abs().amax(dim=1)
        scale = _scale(amax[:, group])
        q = torch.round(block[:, i] / scale).clamp_(-INT4_MAX - 1, INT4_MAX).mul_(scale)
        out[:, i] = q
        err = (block[:, i] - q).div_(hinv[i, i])
        block[:, i:].addr_(err, hinv[i, i:], alpha=-1)
        errors[:, i] = err


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """The column loop runs thousands of tiny ops per Linear: on a busy CPU, waking torch's other threads for each
    costs more than the op (a 1536 x 576 weight took 13 s on 2 shared cores with 2 threads, 0.9 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
