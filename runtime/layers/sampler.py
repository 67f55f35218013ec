"""Token sampling: greedy, temperature, top-k, top-p, with a reproducible stream per request.

Every request that samples owns a torch.Generator (seeded from its `seed`, or from the engine's RNG when
it has none) that draws one uniform number per generated token on the host. The token is then picked by
inverse-CDF over the filtered distribution, so a request's output depends only on its own logits and
seed, never on which other requests share the batch.
"""

from __future__ import annotations

import torch

from llmx.runtime.sequence import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits [S, vocab] float32 -> one token id per row."""
    greedy = torch.tensor([p.greedy for p in params])
    tokens = logits.argmax(dim=-1)
    if bool(greedy.all()):
        return tokens.tolist()
    rows = (~greedy).nonzero().flatten().tolist()
    sampled = _sample_rows(logits[rows], [params[r] for r in rows], [generators[r] for r in rows])
    tokens = tokens.cpu()
    tokens[rows] = sampled.cpu()
    return tokens.tolist()


def _sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    device = logits.device
    vocab = logits.shape[-1]
    temperature = torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device).unsqueeze(1)
    top_p = torch.tensor([p.top_p for p in params], device=device).unsqueeze(1)

    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=device).unsqueeze(0)
    # Keep a token while the mass of the tokens ranked above it is below top_p (so the first always stays).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep = (rank < top_k) & (mass_before < top_p)
    sorted_probs = sorted_probs * keep
    cdf = sorted_probs.cumsum(dim=-1)
    u = torch.stack([torch.rand((), generator=g) for g in generators]).to(device).unsqueeze(1)
    pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=vocab - 1)
    # A zero-probability token can never be picked: searchsorted with right=True skips flat cdf steps.
    return order.gather(1, pick).squeeze(1)
