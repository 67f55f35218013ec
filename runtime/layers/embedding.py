"""Vocabulary-parallel token embedding and LM head.

With TP, rank r holds vocabulary rows [r*V_r, (r+1)*V_r) (V_r = padded vocab / tp). The embedding zeroes
rows outside its range and all-reduces; the LM head computes its slice of the logits and all-gathers.
"""

from __future__ import annotations

import torch
from torch import nn

from llmx.formats.weights import QuantMethod
from llmx.runtime.distributed import get_parallel_context, tp_all_gather_last_dim, tp_all_reduce


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_per_rank: int):
        super().__init__()
        self.vocab_per_rank = vocab_per_rank
        self.weight: torch.Tensor | None = None  # [vocab_per_rank, hidden]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ctx = get_parallel_context()
        if ctx.tp_size == 1:
            return nn.functional.embedding(input_ids, self.weight)
        start = ctx.tp_rank * self.vocab_per_rank
        local = input_ids - start
        outside = (local < 0) | (local >= self.vocab_per_rank)
        out = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return tp_all_reduce(out)


class LMHead(nn.Module):
    """Logits [S, vocab] in float32 for the selected hidden rows. Tied heads read the embedding matrix."""

    def __init__(self, vocab_size: int, rows: int, hidden_size: int, method: QuantMethod,
                 tied_to: VocabEmbedding | None):
        """rows: this rank's vocabulary slice (padded vocab / tp); vocab_size: the real vocabulary."""
        super().__init__()
        self.vocab_size = vocab_size
        self.rows = rows
        self.hidden_size = hidden_size
        self.method = method
        self.tied_to = tied_to
        self.tensors: dict[str, torch.Tensor] = {}

    def forward(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """out: a float32 [S, vocab] buffer to write the logits into (the one conversion kernel either way)."""
        tensors = {"weight": self.tied_to.weight} if self.tied_to is not None else self.tensors
        logits = self.method.apply(tensors, hidden, None)
        logits = tp_all_gather_last_dim(logits)[:, : self.vocab_size]
        return logits.float() if out is None else out.copy_(logits)
