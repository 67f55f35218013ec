"""Token sampling: greedy, temperature, top-k, top-p, with a reproducible stream per request.

Every request that samples owns a torch.Generator (seeded from its `seed`, or from the engine's RNG when
it has none) that draws one uniform number per generated token on the host. The token is then picked by
inverse-CDF over the filtered distribution, so a request's output depends only on its own logits and
seed, never on which other requests share the batch.

`sample` never waits for the device: it returns the tokens as a device tensor, and every host value it
needs (temperatures, uniforms, row indices) goes up from pinned memory without blocking. The engine can
therefore queue the next step before this one's tokens are read back (runtime/engine.py).
"""

from __future__ import annotations

import torch

from llmx.runtime.sequence import SamplingParams

# The kernel modules import triton; they are imported inside the functions that launch them, so importing
# this module does not load triton.


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor, copied from pinned memory without waiting for the device (a
    copy from pageable memory would make the host wait for the queued work first)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """logits [S, vocab] float32 -> int64 [S] token ids, on logits' device."""
    tokens = greedy_tokens(logits)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    index = to_device(rows, torch.int64, logits.device)
    sampled = _sample_rows(logits.index_select(0, index), [params[r] for r in rows], [generators[r] for r in rows])
    return tokens.index_copy_(0, index, sampled)


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax [S] int64; the two-stage Triton kernel on CUDA (torch's one-block-per-row argmax takes
    ~32 us for one 128K-wide row on an H100)."""
    if logits.is_cuda:
        from llmx.kernels.argmax import argmax_rows

        return argmax_rows(logits)
    return logits.argmax(dim=-1)


def _sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    device = logits.device
    vocab = logits.shape[-1]
    temperature = to_device([p.temperature for p in params], torch.float32, device).unsqueeze(1)
    top_k = to_device([p.top_k if p.top_k > 0 else vocab for p in params], torch.int64, device).unsqueeze(1)
    top_p = to_device([p.top_p for p in params], torch.float32, device).unsqueeze(1)

    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=device).unsqueeze(0)
    # Keep a token while the mass of the tokens ranked above it is below top_p (so the first always stays).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep = (rank < top_k) & (mass_before < top_p)
    sorted_probs = sorted_probs * keep
    cdf = sorted_probs.cumsum(dim=-1)
    u = to_device([float(torch.rand((), generator=g)) for g in generators], torch.float32, device).unsqueeze(1)
    pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=vocab - 1)
    # A zero-probability token can never be picked: searchsorted with right=True skips flat cdf steps.
    return order.gather(1, pick).squeeze(1)


def penalize(logits: torch.Tensor, prompt_mask: torch.Tensor, counts: torch.Tensor,
             params: list[SamplingParams]) -> torch.Tensor:
    """Apply each row's repetition, frequency and presence penalties (out of place).

    logits [R, vocab] float32; prompt_mask [R, vocab] bool (the token occurs in the row's prompt);
    counts [R, vocab] float32 (times the row's request generated the token so far).
    """
    device = logits.device
    repetition = to_device([p.repetition_penalty for p in params], torch.float32, device).unsqueeze(1)
    frequency = to_device([p.frequency_penalty for p in params], torch.float32, device).unsqueeze(1)
    presence = to_device([p.presence_penalty for p in params], torch.float32, device).unsqueeze(1)
    generated = counts > 0
    seen = prompt_mask | generated
    repeated = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, repeated, logits)
    return logits - frequency * counts - presence * generated.float()


def ban(logits: torch.Tensor, rows: list[int], token_ids: list[list[int]]) -> torch.Tensor:
    """logits with token_ids[j] made impossible in row rows[j] (in place; e.g. EOS before min_tokens)."""
    pairs = [(r, t) for r, ids in zip(rows, token_ids) for t in ids if t < logits.shape[-1]]
    if pairs:
        r, t = zip(*pairs)
        logits[to_device(list(r), torch.int64, logits.device), to_device(list(t), torch.int64, logits.device)] = \
            float("-inf")
    return logits


def top_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """The model's log-probabilities for a few rows: logits [L, vocab] float32, tokens [L] the chosen ids ->
    (logprob of each chosen token [L], the k likeliest ids [L, k] int64, their logprobs [L, k])."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    values, ids = logprobs.topk(k, dim=-1)
    return chosen, ids, values
