"""Calibration data: documents from files, saved datasets or named hub sets, tokenized and cut into samples.

Sources (`--calib-data`):
- a local .txt file (one document), a .json / .jsonl / .parquet file (one document per row) or a folder
  written by `Dataset.save_to_disk` (its `train` split, else `train_sft`, `validation`, or its only split);
- a known calibration set by name (`CALIBRATION_SETS`: cnn_dailymail, ultrachat_200k, pile_val, wikitext),
  fetched through huggingface_hub's cache (llmx.ingest.hub) from its hub repository: only the first shard of
  the named split, which holds far more text than calibration reads;
- any other hub dataset name (`name` or `name:config`, split train), loaded by `datasets`.
Each row's document is its `text` field, else `messages` (a chat, rendered with the model's chat template,
as it will be prompted), else `article`, else its only string field. Without --calib-data an algorithm that
calibrates uses DEFAULT_CALIBRATION_SET (cnn_dailymail, ModelOpt's own default); offline and not cached,
that is one sentence naming --calib-data.

Sampling is deterministic for a seed: documents are visited in a seeded order and tokenized until about
four times the needed tokens are collected (huge sources are not tokenized whole, and a chat is rendered
only when visited), the token stream is cut into non-overlapping windows of `seq_len`, and `calib_size`
windows are drawn with the seed. The hash of the chosen token ids identifies the calibration set exactly
(data, tokenizer, size, length, seed).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from llmx.common.errors import LlmxError
from llmx.common.progress import Progress
from llmx.formats.families import hf_config_from_model_config, llmx_to_hf_name
from llmx.ingest.hub import fetch_snapshot
from llmx.quant.moe import calibration_parameter

if TYPE_CHECKING:
    import torch

FILE_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
# Which field of a row is its document, in order of preference; "messages" is a chat (list of role/content).
DOCUMENT_FIELDS = ("text", "messages", "article")
# The split a saved DatasetDict is read from: the first of these it has, else its only split.
PREFERRED_SPLITS = ("train", "train_sft", "validation")
_OVERSAMPLE = 4  # tokenize this many times the needed tokens, so the seed has windows to choose from
_CHUNK_CHARS = 200_000  # long documents are tokenized in pieces of about this many characters


@dataclass(frozen=True)
class KnownSet:
    """A calibration set people use, where it lives on the hub and which field holds its documents."""

    repo_id: str  # hub dataset repository
    split: str
    files: str  # the split's first shard in the repository (a glob: shard names carry hashes)
    field: str  # "messages": a chat rendered with the model's chat template
    builder: str  # the `datasets` builder reading `files`


CALIBRATION_SETS = {
    # News articles; ModelOpt's and TensorRT-LLM's default calibration set.
    "cnn_dailymail": KnownSet("abisee/cnn_dailymail", "train", "3.0.0/train-00000-of-*.parquet", "article", "parquet"),
    # Multi-turn chats; llm-compressor's examples calibrate instruct models on its train_sft split.
    "ultrachat_200k": KnownSet("HuggingFaceH4/ultrachat_200k", "train_sft", "data/train_sft-00000-of-*.parquet",
                               "messages", "parquet"),
    # A sample of the Pile's validation set; AutoAWQ's default.
    "pile_val": KnownSet("mit-han-lab/pile-val-backup", "validation", "val.jsonl.zst", "text", "json"),
    # Wikipedia articles (WikiText-2, raw).
    "wikitext": KnownSet("Salesforce/wikitext", "train", "wikitext-2-raw-v1/train-00000-of-*.parquet", "text",
                         "parquet"),
}
DEFAULT_CALIBRATION_SET = "cnn_dailymail"


@dataclass
class CalibrationSet:
    batches: list["torch.Tensor"]  # int64 [batch, seq_len] each; the last batch may be smaller
    num_samples: int
    seq_len: int
    data_hash: str  # "sha256:..." of the sample token ids
    source: str  # the spec, and for a known set the repository and commit it was read from
    warnings: list[str] = field(default_factory=list)


class Documents(Sequence[str]):
    """The documents of a source, rendered on access (a chat through the chat template)."""

    def __init__(self, rows: Sequence[Any], render: Callable[[int, Any], str] | None = None):
        self._rows = rows
        self._render = render

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        row = self._rows[index]
        return self._render(index, row) if self._render is not None else row


def known_set(spec: str) -> tuple[str, KnownSet] | None:
    """(name, set) when `spec` names a known calibration set, by its name or its hub repository."""
    if spec in CALIBRATION_SETS:
        return spec, CALIBRATION_SETS[spec]
    for name, entry in CALIBRATION_SETS.items():
        if spec == entry.repo_id:
            return name, entry
    return None


def load_texts(spec: str, tokenizer: Any = None) -> list[str]:
    """Every document of the calibration source, in source order (chats need the model's `tokenizer`)."""
    return list(load_documents(spec, tokenizer)[0])


def load_documents(spec: str, tokenizer: Any, *, defaulted: bool = False) -> tuple[Documents, str]:
    """(the documents of the calibration source, where they came from).

    defaulted: `spec` is DEFAULT_CALIBRATION_SET standing in for an omitted --calib-data (said in messages).
    """
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() in (".txt", ".text"):
        # A plain text file is one document: read it directly, so calibrating on text needs no `datasets`.
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text:
            raise LlmxError(f"calibration file {path} is empty; pass a file with text to calibrate on.")
        if not text.strip():
            raise LlmxError(f"calibration data {spec} holds no text; pass data with text to calibrate on.")
        return Documents([text]), spec
    import datasets

    with _quiet_datasets(), _scratch_cache() as cache_dir:
        known = None if path.exists() else known_set(spec)
        origin = spec
        if path.is_dir():
            dataset = _load_saved(path, datasets)
        elif path.is_file():
            dataset = _load_file(path, cache_dir, datasets)
        elif known is not None:
            dataset, origin = _load_known(*known, cache_dir, datasets, defaulted=defaulted)
        elif _looks_like_path(spec):
            raise LlmxError(f"calibration data {spec} does not exist; pass an existing .txt, .json, .jsonl or "
                            ".parquet file, a saved dataset folder, or a calibration set name "
                            f"({', '.join(CALIBRATION_SETS)}).")
        else:
            dataset = _load_hub(spec, datasets)
        return _documents(dataset, spec, tokenizer, known[1].field if known else None), origin


def build_calibration_set(spec: str | None, tokenizer: Any, *, calib_size: int, seq_len: int, batch_size: int,
                          seed: int) -> CalibrationSet:
    """Token samples of `spec` (None: DEFAULT_CALIBRATION_SET, with a warning saying so)."""
    import torch

    for name, value in (("--calib-size", calib_size), ("--calib-seq-len", seq_len), ("--batch-size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise LlmxError(f"{name} must be a positive integer, got {value!r}.")
    warnings = []
    defaulted = spec is None
    if defaulted:
        spec = DEFAULT_CALIBRATION_SET
        warnings.append(f"no --calib-data given: calibrated on the {spec} set "
                        f"({CALIBRATION_SETS[spec].repo_id}, split {CALIBRATION_SETS[spec].split}).")
    needed = calib_size * seq_len
    texts, origin = load_documents(spec, tokenizer, defaulted=defaulted)
    tokens = _token_stream(texts, tokenizer, budget=needed * _OVERSAMPLE, seed=seed)
    windows = len(tokens) // seq_len
    if windows == 0:
        raise LlmxError(f"calibration data {spec} holds {len(tokens)} tokens, fewer than one sample of "
                        f"--calib-seq-len {seq_len}; pass more text (the full set needs --calib-size {calib_size} "
                        f"x {seq_len} = {needed} tokens).")
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
                          data_hash="sha256:" + digest.hexdigest(), source=origin, warnings=warnings)


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


def _token_stream(texts: Sequence[str], tokenizer: Any, *, budget: int, seed: int) -> list[int]:
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    separator = tokenizer.eos_token_id
    tokens: list[int] = []
    for index in order:
        text = texts[index]
        if not text.strip():
            continue  # an empty row (wikitext has many) adds no separator
        for piece in _pieces(text):
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
        splits = [s for s in PREFERRED_SPLITS if s in loaded] or (list(loaded) if len(loaded) == 1 else [])
        if not splits:
            raise LlmxError(f"calibration data {path} holds the splits {', '.join(loaded) or 'none'}, none of them "
                            f"{' / '.join(PREFERRED_SPLITS)}; save the split to calibrate on alone.")
        loaded = loaded[splits[0]]
    return loaded


def _load_known(name: str, entry: KnownSet, cache_dir: str, datasets, *, defaulted: bool) -> tuple[Any, str]:
    """The first shard of a known set's split, through huggingface_hub's cache; (dataset, origin)."""
    label = f"{name} ({entry.repo_id}{'; the default without --calib-data' if defaulted else ''})"
    folder = Path(fetch_snapshot(entry.repo_id, None, repo_type="dataset", allow_patterns=[entry.files],
                                 label=label, what="dataset",
                                 instead="pass --calib-data with a local .txt/.jsonl/.parquet file"))
    files = sorted(folder.glob(entry.files))
    if not files:
        raise LlmxError(f"hub dataset {entry.repo_id} (commit {folder.name[:12]}) holds no {entry.files} for the "
                        f"{name} calibration set; pass --calib-data with a local .txt/.jsonl/.parquet file.")
    try:
        dataset = datasets.load_dataset(entry.builder, data_files=[str(files[0])], split="train", cache_dir=cache_dir)
    except Exception as exc:
        raise LlmxError(f"{files[0]} of the {name} calibration set could not be read ({type(exc).__name__}: "
                        f"{_first_line(exc)}); delete it from the hub cache to download it again.") from None
    return dataset, f"{name} ({entry.repo_id}@{folder.name} {files[0].relative_to(folder)})"


def _load_hub(spec: str, datasets):
    name, _, config = spec.partition(":")
    try:
        return datasets.load_dataset(name, config or None, split="train")
    except Exception as exc:
        raise LlmxError(f"calibration data {spec!r} is not a local file or a known calibration set "
                        f"({', '.join(CALIBRATION_SETS)}) and could not be loaded as a hub dataset "
                        f"({type(exc).__name__}: {_first_line(exc)}); pass a local .txt/.json/.jsonl/.parquet "
                        "file or a saved dataset folder (the hub needs network access).") from None


def _documents(dataset, spec: str, tokenizer: Any, field_name: str | None) -> Documents:
    """The rows' documents: `field_name`, else the first of DOCUMENT_FIELDS present, else the only string column.

    Rows are read when visited, so a large shard costs memory only for the documents calibration reads.
    """
    columns = list(dataset.column_names)
    column = field_name or next((c for c in DOCUMENT_FIELDS if c in columns), None)
    if column is None:
        strings = [c for c in columns if getattr(dataset.features.get(c), "dtype", None) in ("string", "large_string")]
        if len(strings) != 1:
            raise LlmxError(f"calibration data {spec} has no `text`, `messages` or `article` column (columns: "
                            f"{', '.join(columns) or 'none'}); name the column holding the text `text`.")
        column = strings[0]
    if column not in columns:
        raise LlmxError(f"calibration data {spec} has no `{column}` column (columns: {', '.join(columns)}); "
                        "the hub dataset changed its layout: pass --calib-data with a local file.")
    if len(dataset) == 0:
        raise LlmxError(f"calibration data {spec} holds no text; pass data with text to calibrate on.")
    rows = dataset.select_columns([column])
    if column == "messages":
        return _chats(rows, spec, tokenizer)
    return Documents(rows, lambda index, row: row[column] if isinstance(row[column], str) else "")


def _chats(rows: Sequence[Any], spec: str, tokenizer: Any) -> Documents:
    """Chats rendered as the model is prompted with them: its chat template, no generation prompt appended."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise LlmxError(f"calibration data {spec} holds chats (`messages`), but the model's tokenizer has no chat "
                        "template to render them with; calibrate on plain text (a `text` column or a .txt file).")

    def render(index: int, row: dict) -> str:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise LlmxError(f"calibration data {spec}: row {index} `messages` is not a list of "
                            '{"role": ..., "content": ...} objects with string values; fix or remove that row.')
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as exc:  # jinja raises its own types (e.g. a template that rejects a role order)
            raise LlmxError(f"calibration data {spec}: row {index} could not be rendered with the chat template "
                            f"({type(exc).__name__}: {_first_line(exc)}); fix or remove that row.") from None

    return Documents(rows, render)


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

    hf = hf_config_from_model_config(model, dtype)
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    with _no_init_weights():
        hf_model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    params = dict(hf_model.named_parameters(remove_duplicate=False))
    missing = set(params)
    for name, tensor in tensors:
        # Experts (3-D in transformers 5) and routers sit elsewhere than their hub names (llmx.quant.moe).
        hf_name, index = calibration_parameter(name, model) or (llmx_to_hf_name(name, model.family), ())
        with torch.no_grad():
            params[hf_name][index].copy_(tensor)
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
