"""Perplexity over a text file: the accuracy yardstick for quantization (`llmx eval`).

The text is tokenized without special tokens and cut into non-overlapping windows of `seq_len` tokens
from its start; each window is scored independently (a fresh KV cache), predicting tokens 2..seq_len
from their prefixes. The same file, seq_len and window count give the same windows for every model
with the same tokenizer, which is what makes two perplexities comparable.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from llmx.common.errors import LlmxError
from llmx.common.hashing import hash_files
from llmx.common.progress import Progress
from llmx.common.text import read_utf8
from llmx.formats.config import BuildConfig

# The llmx modules that import torch are imported inside the functions that use them, so importing this
# module does not load torch.

# math.exp overflows past this mean NLL (nats); the perplexity of such a model is reported as infinite.
_MAX_EXP_ARGUMENT = 709.0


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    num_tokens: int  # predicted tokens: num_windows * (seq_len - 1)
    num_windows: int
    seq_len: int
    data_hash: str
    data: str

    def to_dict(self) -> dict:
        return asdict(self)


def _windows(token_ids: list[int], seq_len: int, windows: int | None, data: Path) -> list[list[int]]:
    available = len(token_ids) // seq_len
    if available == 0 or (windows is not None and windows > available):
        wanted = seq_len * (windows or 1)
        raise LlmxError(f"{data}: has {len(token_ids)} tokens, {wanted} are needed for "
                        f"{windows or 1} window(s) of {seq_len}; use a longer text, a smaller --seq-len or fewer --windows.")
    count = available if windows is None else windows
    return [token_ids[i * seq_len:(i + 1) * seq_len] for i in range(count)]


def evaluate_perplexity(path: str | Path, data: str | Path, *, seq_len: int = 512, windows: int | None = None,
                        device: str | None = None, progress: Progress | None = None) -> PerplexityResult:
    """Perplexity of the engine (or checkpoint: a temporary engine is built) at `path` on the text `data`.
    progress: None or a `progress(stage, done, total)` sink; scoring reports stage "windows"."""
    path, data = Path(path), Path(data)
    if not data.is_file():
        raise LlmxError(f"{data}: no such file; pass a UTF-8 text file with --data.")
    if seq_len < 2:
        raise LlmxError(f"--seq-len must be at least 2, got {seq_len}.")
    text = read_utf8(data, what="text to score")  # before loading anything: a bad byte is found in milliseconds
    if (path / "llmx.json").exists() and not (path / "engine.json").exists():
        with tempfile.TemporaryDirectory(prefix="llmx-eval-") as tmp:
            engine_dir = _build_temporary_engine(path, Path(tmp) / "engine", seq_len, device)
            return _evaluate_engine(engine_dir, data, text, seq_len, windows, device, progress)
    return _evaluate_engine(path, data, text, seq_len, windows, device, progress)


def _build_temporary_engine(ckpt: Path, out: Path, seq_len: int, device: str | None) -> Path:
    import torch

    from llmx.build.engine import build_engine

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    build = BuildConfig(max_batch_size=1, max_seq_len=seq_len, max_num_tokens=seq_len, device=dev)
    return build_engine(ckpt, out, build).path


def _evaluate_engine(engine_dir: Path, data: Path, text: str, seq_len: int, windows: int | None,
                     device: str | None, progress) -> PerplexityResult:
    from llmx.runtime.engine import LLM

    # Scoring runs whole windows as prefill: decode CUDA graphs would only cost start-up time.
    with LLM(engine_dir, device=device, kv_cache_tokens=seq_len, enforce_eager=True) as llm:  # closes the ranks
        if seq_len > llm.max_seq_len:
            raise LlmxError(f"--seq-len {seq_len} exceeds the engine's max_seq_len {llm.max_seq_len}; "
                            "use a smaller --seq-len or rebuild with a larger --max-seq-len.")
        token_ids = llm.tokenizer.encode(text, add_special_tokens=False)
        chunks = _windows(token_ids, seq_len, windows, data)
        total_nll = 0.0
        for i, window in enumerate(chunks):
            total_nll -= float(llm.runner.score(window).double().sum())
            if progress:
                progress("windows", i + 1, len(chunks))
    num_tokens = len(chunks) * (seq_len - 1)
    mean = total_nll / num_tokens
    return PerplexityResult(perplexity=perplexity_of(mean), mean_nll=mean, num_tokens=num_tokens,
                            num_windows=len(chunks), seq_len=seq_len, data_hash=hash_files([data]),
                            data=str(data))


def perplexity_of(mean_nll: float) -> float:
    """exp(mean NLL), infinite past float range and NaN for a NaN mean (gates fail both)."""
    return math.exp(mean_nll) if mean_nll <= _MAX_EXP_ARGUMENT or math.isnan(mean_nll) else math.inf
