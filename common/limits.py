"""The ranges numbers must fall in where they enter llmx: flags, recipe values and the sizes in model files.

Each range is far beyond every released model and sensible setting, and small enough that a typo (an
extra digit, a minus sign, NaN from a broken export) is refused in one sentence before it becomes
terabytes of random weights, an allocation that cannot succeed, or a comparison that NaN always passes.
`check_number` is the one test; the tables say what each field allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAX_UINT64 = 2**64 - 1


@dataclass(frozen=True)
class Range:
    """An integer or a finite float between low and high; `low_open` excludes low itself (x > low)."""

    low: float | None = None
    high: float | None = None
    integer: bool = True
    low_open: bool = False

    def allowed(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        low = None if self.low is None else _show(self.low)
        high = None if self.high is None else _show(self.high)
        if low is not None and high is not None and not self.low_open:
            return f"{kind} from {low} to {high}"
        parts = []
        if low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {low}")
        if high is not None:
            parts.append(f"<= {high}")
        return f"{kind} {' and '.join(parts)}" if parts else kind


def _show(value: float) -> str:
    if float(value).is_integer() and (isinstance(value, int) or abs(value) < 1e10):
        value = int(value)
        return f"2^64 - 1 ({value:,})" if value == MAX_UINT64 else f"{value:,}"
    return f"{value:g}"


def check_number(value: Any, rule: Range) -> str | None:
    """None when `value` obeys `rule`; otherwise what is allowed ("an integer from 1 to 1,024")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return rule.allowed()
    if rule.integer and not isinstance(value, int):
        return rule.allowed()
    if isinstance(value, float) and not math.isfinite(value):
        return rule.allowed()
    if rule.low is not None and (value <= rule.low if rule.low_open else value < rule.low):
        return rule.allowed()
    if rule.high is not None and value > rule.high:
        return rule.allowed()
    return None


def out_of_range(values: dict[str, Any], limits: dict[str, "Range"]) -> tuple[str, str] | None:
    """The first (key, "must be ..., got ...") among `values` that breaks its rule in `limits` (None skipped)."""
    for key, value in values.items():
        rule = limits.get(key)
        if rule is None or value is None:
            continue
        allowed = check_number(value, rule)
        if allowed is not None:
            return key, f"must be {allowed}, got {value!r}"
    return None


_TOKENS = Range(1, 1 << 24)  # a sequence length or token count: 16.7 M, beyond any model's context
PERCENT = Range(0, 1e6, integer=False)
_THRESHOLD = Range(0, 1e12, integer=False, low_open=True)

# Command settings (flags and recipe sections), by key; a key not listed here has no numeric range.
SETTING_LIMITS: dict[str, Range] = {
    "seed": Range(0, MAX_UINT64),
    "isl": _TOKENS, "osl": _TOKENS, "seq_len": Range(2, 1 << 24), "calib_seq_len": _TOKENS,
    "max_seq_len": _TOKENS, "max_num_tokens": _TOKENS, "max_new_tokens": _TOKENS, "min_tokens": Range(0, 1 << 24),
    "num_requests": Range(1, 1 << 24), "windows": Range(1, 1 << 24), "calib_size": Range(1, 1 << 24),
    "warmup": Range(0, 1 << 20), "concurrency": Range(1, 1 << 20),
    "max_batch_size": Range(1, 1 << 16), "batch_size": Range(1, 1 << 16), "n": Range(1, 1 << 10),
    "kv_block_size": Range(1, 1024), "group_size": Range(1, 1 << 16), "tp": Range(1, 1024), "pp": Range(1, 1024),
    "kv_cache_tokens": Range(1, 1 << 32), "top_k": Range(0, 1 << 22), "logprobs": Range(0, 1 << 10),
    "request_rate": Range(0, 1e9, integer=False, low_open=True),
    "kv_cache_fraction": Range(0, 1, integer=False, low_open=True),
    "tolerance": PERCENT, "max_increase": PERCENT,
    "temperature": Range(0, 1e4, integer=False), "top_p": Range(0, 1, integer=False, low_open=True),
    "presence_penalty": Range(-1e4, 1e4, integer=False), "frequency_penalty": Range(-1e4, 1e4, integer=False),
    "repetition_penalty": Range(0, 1e4, integer=False, low_open=True),
    # pipeline gate thresholds
    "min_output_tok_s": _THRESHOLD, "max_ttft_ms": _THRESHOLD, "max_tpot_ms": _THRESHOLD,
    "max_e2e_ms": _THRESHOLD, "max_perplexity": _THRESHOLD,
}

# Model shapes read from config.json, llmx.json and engine.json (ModelConfig field names).
MODEL_LIMITS: dict[str, Range] = {
    "vocab_size": Range(1, 1 << 22),  # 4.2 M; the largest released vocabularies are ~256 k
    "hidden_size": Range(1, 1 << 16),
    "intermediate_size": Range(1, 1 << 18),
    "num_layers": Range(1, 1024),
    "num_heads": Range(1, 1024),
    "num_kv_heads": Range(1, 1024),
    "head_dim": Range(2, 1024),
    "max_position_embeddings": _TOKENS,
    "sliding_window": _TOKENS,
    "rms_norm_eps": Range(0, 1, integer=False, low_open=True),
    "rope_theta": Range(0, 1e12, integer=False, low_open=True),
}
ROPE_SCALING_LIMITS: dict[str, Range] = {
    "factor": Range(0, 1e4, integer=False, low_open=True),
    "low_freq_factor": Range(0, 1e4, integer=False, low_open=True),
    "high_freq_factor": Range(0, 1e4, integer=False, low_open=True),
    "original_max_position_embeddings": _TOKENS,
}
# Dense models of the supported families top out at ~405 B parameters; 2 TB of bfloat16 weights is refused.
MAX_PARAMETERS = 10**12
