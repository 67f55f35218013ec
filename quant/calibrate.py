"""Calibration data: text sources read through `datasets`, tokenized and cut into fixed-length samples.

Sources (`--calib-data`): a local .txt (one document per file), .json / .jsonl / .parquet file (one
document per row, from its `text` column or its only string column), a folder written by
`Dataset.save_to_disk`, or a Hugging Face hub dataset name (`name` or `name:config`, split train; needs
network access). llmx ships no default data: algorithms that calibrate require --calib-data.

Sampling is deterministic for a seed: documents are visited in a seeded order and tokenized until about
four times the needed tokens are collected (huge sources are not tokenized whole), the token stream is
cut into non-overlapping windows of `seq_len`, and `calib_size` windows are drawn with the seed. The
hash of the chosen token ids identifies the calibration set exactly (data, tokenizer, size, length, seed).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from llmx.common.errors import LlmxError
from llmx.common.progress import Progress

if TYPE_CHECKING:
    import torch

FILE_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_OVERSAMPLE = 4  # tokenize this many times the needed tokens, so the seed has windows to choose from
_CHUNK_CHARS = 200_000  # long documents are tokenized in pieces of about this many characters



@dataclass
class CalibrationSet:
    batches: list["torch.Tensor"]  # int64 [batch, seq_len] each; the last batch may be smaller
    num_samples: int
    seq_len: int
    data_hash: str  # "sha256:..." of the sample token ids
    source: str
    warnings: list[str] = field(default_factory=list)


def load_texts(spec: str) -> list[str]:
    """Every document of the calibration source, in source order."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".txt":
        # A plain text file is one document: read it directly, so calibrating on text needs no `datasets`.
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text:
            raise LlmxError(f"calibration file {path} is empty; pass a file with text to calibrate on.")
        if not text.strip():
            raise LlmxError(f"calibration data {spec} holds no text; pass data with text to calibrate on.")
        return [text]
    import datasets

    with _quiet_datasets(), _scratch_cache() as cache_dir:
        if path.is_dir():
            dataset = _load_saved(path, datasets)
        elif path.is_file():
            dataset = _load_file(path, cache_dir, datasets)
        elif _looks_like_path(spec):
            raise LlmxError(f"calibration data {spec} does not exist; pass an existing .txt, .json, .jsonl or "
                            ".parquet file, a saved dataset folder, or a hub dataset name.")
        else:
            dataset = _load_hub(spec, datasets)
        return _text_column(dataset, spec)


def build_calibration_set(spec: str, tokenizer: Any, *, calib_size: int, seq_len: int, batch_size: int,
                          seed: int) -> CalibrationSet:
    import torch

    for name, value in (("--calib-size", calib_size), ("--calib-seq-len", seq_len), ("--batch-size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise LlmxError(f"{name} must be a positive integer, got {value!r}.")
    needed = calib_size * seq_len
    texts = load_texts(spec)
    tokens = _token_stream(texts, tokenizer, budget=needed * _OVERSAMPLE, seed=seed)
    windows = len(tokens) // seq_len
    if windows == 0:
        raise LlmxError(f"calibration data {spec} holds {len(tokens)} tokens, fewer than one sample of "
                        f"--calib-seq-len {seq_len}; pass more text (the full set needs --calib-size {calib_size} "
                        f"x {seq_len} = {needed} tokens).")
    warnings = []
    if windows < calib_size:
        warnings.append(f"calibration data {spec} holds {len(tokens)} tokens: {windows} samples of {seq_len} "
                        f"tokens were used instead of --calib-size {calib_size} ({needed} tokens needed).")
        chosen = list(range(windows))
    else:
        chosen = sorted(random.Random(seed).sample(range(windows), calib_size))
    ids = torch.tensor(tokens[: windows * seq_len], dtype=torch.int64).reshape(windows, seq_len)[chosen]
    digest = hashlib.sha256(f"{seq_len}:".encode())
    digest.update(ids.to(torch.int32).numpy().tobytes())
    return CalibrationSet(batches=list(ids.split(batch_size)), num_samples=len(chosen), seq_len=seq_len,
                          data_hash="sha256:" + digest.hexdigest(), source=spec, warnings=warnings)


def make_forward_loop(calib: CalibrationSet, *, use_cache: bool = True,
                      progress: Progress | None = None) -> Callable[[Any], None]:
    """The `forward_loop(model)` ModelOpt calls; every call (AWQ and GPTQ make several) reports a pass."""
    import torch

    passes = 0

    def forward_loop(model) -> None:
        nonlocal passes
        passes += 1
        stage = "calibrate" if passes == 1 else f"calibrate (pass {passes})"
        device = next(model.parameters()).device
        with torch.no_grad():
            for i, batch in enumerate(calib.batches):
                model(input_ids=batch.to(device), use_cache=use_cache)
                if progress is not None:
                    progress(stage, i + 1, len(calib.batches))

    return forward_loop


def _token_stream(texts: list[str], tokenizer: Any, *, budget: int, seed: int) -> list[int]:
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    separator = tokenizer.eos_token_id
    tokens: list[int] = []
    for index in order:
        for piece in _pieces(texts[index]):
            tokens.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
            if len(tokens) >= budget:
                return tokens
        if separator is not None:
            tokens.append(separator)
    return tokens


def _pieces(text: str) -> Iterator[str]:
    """Cut a long document at whitespace into pieces of about _CHUNK_CHARS (tokenizers slow down on huge strings)."""
    start = 0
    while start < len(text):
        end = min(start + _CHUNK_CHARS, len(text))
        if end < len(text):
            cut = max(text.rfind("\n", start, end), text.rfind(" ", start, end))
            end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end


def _looks_like_path(spec: str) -> bool:
    return Path(spec).suffix.lower() in FILE_BUILDERS or spec.startswith((".", "/", "~")) or "\\" in spec


def _load_file(path: Path, cache_dir: str, datasets):
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise LlmxError(f"calibration file {path} has an unsupported type {path.suffix!r}; use "
                        f"{', '.join(sorted(FILE_BUILDERS))}, or a folder written by Dataset.save_to_disk.")
    if path.stat().st_size == 0:
        raise LlmxError(f"calibration file {path} is empty; pass a file with text to calibrate on.")
    extra = {"sample_by": "document"} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir, **extra)
    except Exception as exc:  # datasets raises many types for malformed files
        raise LlmxError(f"calibration file {path} could not be read as {builder} ({type(exc).__name__}: "
                        f"{_first_line(exc)}); check its format.") from None


def _load_saved(path: Path, datasets):
    if not any((path / marker).exists() for marker in SAVED_DATASET_MARKERS):
        raise LlmxError(f"calibration data {path} is a folder but not a saved dataset (no "
                        f"{' / '.join(SAVED_DATASET_MARKERS)}); pass a file, or a folder written by "
                        "Dataset.save_to_disk.")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise LlmxError(f"calibration data {path} could not be loaded with datasets.load_from_disk "
                        f"({type(exc).__name__}: {_first_line(exc)}); re-save it with Dataset.save_to_disk.") from None
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if "train" in loaded else next(iter(loaded), None)
        if split is None:
            raise LlmxError(f"calibration data {path} holds no splits; pass a dataset with rows of text.")
        loaded = loaded[split]
    return loaded


def _load_hub(spec: str, datasets):
    name, _, config = spec.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split="train")
    except Exception as exc:
        raise LlmxError(f"calibration data {spec!r} is not a local file and could not be loaded as a hub dataset "
                        f"({type(exc).__name__}: {_first_line(exc)}); pass a local .txt/.json/.jsonl/.parquet "
                        "file or a saved dataset folder (the hub needs network access).") from None


def _text_column(dataset, spec: str) -> list[str]:
    columns = list(dataset.column_names)
    if "text" in columns:
        column = "text"
    else:
        strings = [c for c in columns if getattr(dataset.features.get(c), "dtype", None) in ("string", "large_string")]
        if len(strings) != 1:
            raise LlmxError(f"calibration data {spec} has no `text` column (columns: {', '.join(columns) or 'none'}); "
                            "name the column holding the text `text`.")
        column = strings[0]
    texts = [t for t in dataset[column] if isinstance(t, str) and t.strip()]
    if not texts:
        raise LlmxError(f"calibration data {spec} holds no text; pass data with text to calibrate on.")
    return texts


@contextlib.contextmanager
def _quiet_datasets():
    """datasets draws progress bars on stderr; llmx reports progress itself."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def _scratch_cache() -> Iterator[str]:
    """Local files are converted to Arrow in a throwaway cache, not in the user's ~/.cache."""
    path = tempfile.mkdtemp(prefix="llmx-calib-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"


def build_calibration_model(model: Any, dtype: str, tensors: Iterator[tuple[str, "torch.Tensor"]],
                            device: str) -> Any:
    """A transformers model equal to the llmx checkpoint, for ModelOpt to calibrate.

    `tensors` yields (llmx name, tensor) for every checkpoint tensor; they are copied into parameters
    allocated without random initialization, so loading costs one pass over the weights.
    """
    import torch
    import transformers

    from llmx.build.families import hf_config_from_model_config, llmx_to_hf_name

    hf = hf_config_from_model_config(model, dtype)
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    with _no_init_weights():
        hf_model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    params = dict(hf_model.named_parameters(remove_duplicate=False))
    missing = set(params)
    for name, tensor in tensors:
        hf_name = llmx_to_hf_name(name)
        with torch.no_grad():
            params[hf_name].copy_(tensor)
        missing.discard(hf_name)
    if model.tie_word_embeddings:
        hf_model.tie_weights()
        missing.discard("lm_head.weight")
    if missing:
        raise LlmxError(f"the checkpoint lacks `{sorted(missing)[0]}` for the calibration model; re-create it "
                        "with `llmx convert`.")
    return hf_model.eval().to(device)


@contextlib.contextmanager
def _no_init_weights():
    """transformers' switch that skips random initialization (moved between major versions)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        yield
