"""`llmx quantize`: an unquantized llmx checkpoint (or an HF folder, converted on the fly) -> a quantized
llmx checkpoint, or a ModelOpt unified HF checkpoint with `export_format="hf"`.

Steps: validate every option before any heavy work; build the calibration set; load the checkpoint into
a transformers model; calibrate it with ModelOpt (llmx.quant.modelopt); write the output atomically
(llmx.quant.export_llmx or llmx.quant.export_hf). No printing: `progress(stage, done, total)` reports
the stages "load", "calibrate" (one per forward pass over the data), "export".

The LM head stays unquantized unless `quantize_lm_head=True`: it is then quantized like the decoder
Linears (same format and algorithm; AWQ/SmoothQuant's smoothing vector is folded into the final norm,
GPTQ runs on it after the layers). Models that tie the head to the input embedding cannot use it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from llmx.common.atomic import atomic_output_dir, check_output_dir
from llmx.common.errors import LlmxError
from llmx.common.progress import Progress
from llmx.formats import presets
from llmx.formats.checkpoint import (CHECKPOINT_FILE, FUSED_GROUPS, checkpoint_tensor_specs, linear_modules,
                                     make_provenance, rank_file, read_checkpoint, verify_tensors, write_checkpoint_meta)
from llmx.formats.config import PRE_QUANT_SCALE_KEY, SUPPORTED_DTYPES, Mapping, QuantConfig
from llmx.formats.families import llmx_to_hf_name, read_hf_config
from llmx.formats.safetensors_stream import SafetensorsFile, SafetensorsStreamWriter, TensorEntry
from llmx.formats.tokenizer_files import copy_files, find_tokenizer_files
from llmx.formats.weights.int4 import check_group_divides
from llmx.formats.weights.kv_cache import check_kv_cache_dtype
from llmx.formats.weights.nvfp4 import check_block_divides
from llmx.ingest.convert import convert
from llmx.ingest.hf_import import is_modelopt_checkpoint
from llmx.quant.calibrate import build_calibration_model, build_calibration_set, make_forward_loop
from llmx.quant.export_hf import HF_QUANT_CONFIG, export_hf
from llmx.quant.export_llmx import export_tensors, pre_quant_scale_patterns
from llmx.quant.gptq import GptqSettings
from llmx.quant.modelopt import (gptq_layerwise, gptq_module, modelopt_version, quantize_model, quantized_linear_names,
                                 read_kv_amax, read_linear_state)
from llmx.quant.moe import (ExpertTokenCounts, check_algo as check_moe_algo, coverage_warnings, expert_module,
                            expert_quantizer_entries, read_expert_state)

if TYPE_CHECKING:
    from llmx.formats.checkpoint import Checkpoint
    from llmx.formats.config import ModelConfig, QuantConfig
    from llmx.quant.export_llmx import LinearState

EXPORT_FORMATS = ("llmx", "hf")
LM_HEAD = "lm_head"
# Standard practice: the logits are the most quantization-sensitive GEMM. Dropped by quantize_lm_head=True.
DEFAULT_EXCLUDE = (LM_HEAD,)
# Calibration (samples, tokens per sample) when the caller gives none, by where calibration runs. On a GPU,
# ModelOpt's usual 512 x 512. On a CPU those 262k tokens took 15 min (int8_sq) to 71 min (int4_awq) for the
# 135M SmolLM2 on a 2-core machine; 64 x 256 is 16x fewer tokens (QUANTIZATION.md has the times and accuracy).
CALIBRATION_DEFAULTS = {"cuda": (512, 512), "cpu": (64, 256)}


@dataclass
class QuantizeResult:
    path: Path
    algo: str
    quantized_modules: list[str]
    skipped_modules: list[str]
    size_before_bytes: int
    size_after_bytes: int
    seconds: float
    calib_data_hash: str | None
    warnings: list[str] = field(default_factory=list)
    calib_shape: tuple[int, int] | None = None  # (samples, tokens per sample) calibrated on; None: no calibration
    group_size: int | None = None  # inputs per scale of the grouped formats, as the checkpoint records it
    group_size_chosen: bool = False  # True when quantize chose it for the model (no group_size given)
    # Mixtures of experts: sparse layer -> how many of its experts calibration routed no token to (quant/moe.py).
    experts_without_tokens: dict[int, int] | None = None


@dataclass(frozen=True)
class ModulePlan:
    quantized: list[str]  # llmx Linear names
    skipped: list[str]
    warnings: list[str]


@dataclass(frozen=True)
class _Options:
    """quantize()'s options, validated and resolved (canonical algorithm, calibration size for the device)."""
    algo: str
    kv_cache_dtype: str | None
    calib_data: str | None
    calib_size: int
    calib_seq_len: int
    batch_size: int
    group_size: int | None  # None: chosen for the model when choose_group_size
    choose_group_size: bool
    calibrates: bool
    exclude: tuple[str, ...]
    device: str
    seed: int
    quantize_lm_head: bool
    gptq: "GptqSettings | None"  # int4_gptq's settings; None for the other algorithms


@dataclass
class CalibratedModel:
    """The transformers model ModelOpt calibrated (fake-quantized), with what quantize() exports it by."""
    model: Any
    src: Path  # what quantize() was given: an llmx checkpoint or an HF folder converted on the fly
    ckpt: "Checkpoint"
    quant: "QuantConfig"
    plan: ModulePlan
    calib: Any  # llmx.quant.calibrate.CalibrationSet, or None when the algorithm takes no data
    source_hash: str
    options: _Options
    experts_without_tokens: dict[int, int] | None = None  # mixtures of experts: sparse layer -> experts unreached

    def write_llmx(self, out: Path, *, recipe: str | None = None, progress: Progress | None = None) -> None:
        """Export the calibrated model as a quantized llmx checkpoint at `out` (written atomically)."""
        _write_llmx(self.model, self.ckpt, self.quant, self.plan, Path(out), self.provenance(recipe), progress)

    def provenance(self, recipe: str | None) -> dict:
        o = self.options
        return _provenance(self.src, self.source_hash, self.calib, o.calib_data, o.calib_size, o.calib_seq_len, o.seed,
                           recipe)


def quantize(src: Path, out: Path, *, algo: str, kv_cache_dtype: str | None = None, calib_data: str | None = None,
             calib_size: int | None = None, calib_seq_len: int | None = None, batch_size: int = 8,
             group_size: int | None = None,
             exclude: tuple[str, ...] = (), device: str = "cpu", seed: int = 0, export_format: str = "llmx",
             force: bool = False, recipe: str | None = None, progress: Progress | None = None,
             quantize_lm_head: bool = False, gptq_damp: float | None = None, gptq_block_size: int | None = None,
             gptq_act_order: bool | None = None) -> QuantizeResult:
    """gptq_*: int4_gptq's settings (llmx.quant.gptq.GptqSettings; None: its default), refused with other algos."""
    started = time.perf_counter()
    src, out = Path(src), Path(out)
    options = _resolve_options(algo=algo, kv_cache_dtype=kv_cache_dtype, calib_data=calib_data, calib_size=calib_size,
                               calib_seq_len=calib_seq_len, batch_size=batch_size, group_size=group_size,
                               exclude=exclude, device=device, seed=seed, quantize_lm_head=quantize_lm_head,
                               gptq_damp=gptq_damp, gptq_block_size=gptq_block_size, gptq_act_order=gptq_act_order)
    if export_format not in EXPORT_FORMATS:
        raise LlmxError(f"--export-format {export_format!r} is not supported; choose {' or '.join(EXPORT_FORMATS)}.")
    _check_output(src, out, export_format, force)
    if options.quantize_lm_head:
        _check_untied_head(src)

    with _calibrated(src, options, progress) as calibrated:
        if export_format == "llmx":
            calibrated.write_llmx(out, recipe=recipe, progress=progress)
        else:
            _write_hf(calibrated.model, calibrated.ckpt, out)
        size_before = calibrated.ckpt.rank_path(0).stat().st_size
        plan, calib, group = calibrated.plan, calibrated.calib, calibrated.quant.group_size
        unseen = calibrated.experts_without_tokens
    warnings = plan.warnings + (calib.warnings if calib is not None else [])
    return QuantizeResult(path=out, algo=options.algo, quantized_modules=plan.quantized,
                          skipped_modules=plan.skipped, size_before_bytes=size_before,
                          size_after_bytes=_weights_size(out), seconds=time.perf_counter() - started,
                          calib_data_hash=calib.data_hash if calib is not None else None, warnings=warnings,
                          calib_shape=(calib.num_samples, options.calib_seq_len) if calib is not None else None,
                          group_size=group, group_size_chosen=options.choose_group_size,
                          experts_without_tokens=unseen)


@contextlib.contextmanager
def calibrated_model(src: Path, *, algo: str, kv_cache_dtype: str | None = None, calib_data: str | None = None,
                     calib_size: int | None = None, calib_seq_len: int | None = None, batch_size: int = 8,
                     group_size: int | None = None, exclude: tuple[str, ...] = (), device: str = "cpu",
                     seed: int = 0, quantize_lm_head: bool = False, gptq_damp: float | None = None,
                     gptq_block_size: int | None = None, gptq_act_order: bool | None = None,
                     progress: Progress | None = None) -> Iterator[CalibratedModel]:
    """ModelOpt's calibrated model for `src`, exactly as quantize() calibrates it with the same options.

    The model is transformers' with ModelOpt's fake quantizers: scoring it measures the algorithm alone
    (measurements/quant_reference.py), and `write_llmx` exports the very same calibration.
    """
    options = _resolve_options(algo=algo, kv_cache_dtype=kv_cache_dtype, calib_data=calib_data, calib_size=calib_size,
                               calib_seq_len=calib_seq_len, batch_size=batch_size, group_size=group_size,
                               exclude=exclude, device=device, seed=seed, quantize_lm_head=quantize_lm_head,
                               gptq_damp=gptq_damp, gptq_block_size=gptq_block_size, gptq_act_order=gptq_act_order)
    if options.quantize_lm_head:
        _check_untied_head(Path(src))
    with _calibrated(Path(src), options, progress) as calibrated:
        yield calibrated


def _resolve_options(*, algo: str, kv_cache_dtype: str | None, calib_data: str | None, calib_size: int | None,
                     calib_seq_len: int | None, batch_size: int, group_size: int | None, exclude: tuple[str, ...],
                     device: str, seed: int, quantize_lm_head: bool, gptq_damp: float | None = None,
                     gptq_block_size: int | None = None, gptq_act_order: bool | None = None) -> _Options:
    """Every option checked (one sentence each) before any heavy work, and the defaults filled in."""
    algo = presets.resolve_algo(algo)
    kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype)
    if algo == presets.KV_ONLY and kv_cache_dtype is None:
        raise LlmxError("--algo none quantizes nothing: add --kv-cache-dtype fp8|int8 to quantize only the KV "
                        f"cache, or choose an algorithm ({', '.join(presets.PRESETS)}).")
    group = presets.effective_group_size(algo, group_size)
    device = _check_device(device)
    default_size, default_seq_len = CALIBRATION_DEFAULTS["cpu" if device == "cpu" else "cuda"]
    exclude = tuple(exclude)
    return _Options(algo=algo, kv_cache_dtype=kv_cache_dtype, calib_data=calib_data,
                    calib_size=default_size if calib_size is None else calib_size,
                    calib_seq_len=default_seq_len if calib_seq_len is None else calib_seq_len,
                    batch_size=batch_size, group_size=group,
                    choose_group_size=presets.chooses_group_size(algo, group_size),
                    calibrates=presets.needs_calibration(algo, kv_cache_dtype), exclude=exclude, device=device,
                    seed=seed, quantize_lm_head=_check_lm_head_options(quantize_lm_head, algo, exclude),
                    gptq=_gptq_settings(algo, gptq_damp, gptq_block_size, gptq_act_order))


def _gptq_settings(algo: str, damp: float | None, block_size: int | None,
                   act_order: bool | None) -> "GptqSettings | None":
    """int4_gptq's settings, defaults filled in; a GPTQ option given with another algorithm is refused."""
    given = {"--gptq-damp": damp, "--gptq-block-size": block_size, "--gptq-act-order": act_order}
    if algo == presets.KV_ONLY or not presets.PRESETS[algo].layerwise:
        flag = next((name for name, value in given.items() if value is not None), None)
        if flag is not None:
            raise LlmxError(f"{flag} sets GPTQ, and --algo {algo} does not run GPTQ; drop {flag} or use "
                            "--algo int4_gptq.")
        return None
    defaults = GptqSettings()
    settings = GptqSettings(damp=defaults.damp if damp is None else damp,
                            block_size=defaults.block_size if block_size is None else block_size,
                            act_order=defaults.act_order if act_order is None else act_order)
    return settings.check(group_size=1)  # the block size against the group size once the group is known


@contextlib.contextmanager
def _calibrated(src: Path, o: _Options, progress: Progress | None) -> Iterator[CalibratedModel]:
    with _source_checkpoint(src) as ckpt:
        if ckpt.quant is not None:
            raise LlmxError(f"{src} is already quantized (algo {ckpt.quant.algo}); quantize the unquantized "
                            "checkpoint it was made from.")
        if ckpt.model.family == "phi3":
            raise LlmxError(f"{src}: quantizing {ckpt.model.architecture} is not supported yet (ModelOpt calibrates "
                            "transformers' Phi-3, whose fused qkv_proj / gate_up_proj llmx stores split); build and "
                            "run this checkpoint unquantized.")
        check_moe_algo(ckpt.model, o.algo, src)
        group = o.group_size
        plan = plan_modules(ckpt.model, o.algo, o.exclude, group, quantize_lm_head=o.quantize_lm_head)
        if o.choose_group_size:
            group = presets.choose_group_size(_in_features(ckpt.model, plan))
        quant = _quant_config(o.algo, group, o.kv_cache_dtype, o.exclude, plan, quantize_lm_head=o.quantize_lm_head)
        if o.gptq is not None:
            o.gptq.check(group)
        calib = None
        if o.calibrates:
            calib = build_calibration_set(o.calib_data, _tokenizer(ckpt.path), calib_size=o.calib_size,
                                          seq_len=o.calib_seq_len, batch_size=o.batch_size, seed=o.seed)
        model, source_hash = _load_model(ckpt, o.device, progress)
        unseen = _calibrate(model, o.algo, quant, plan, calib, progress, gptq=o.gptq, config=ckpt.model)
        if unseen is not None:
            plan = dataclasses.replace(plan, warnings=plan.warnings + coverage_warnings(unseen, ckpt.model.num_experts))
        yield CalibratedModel(model=model, src=src, ckpt=ckpt, quant=quant, plan=plan, calib=calib,
                              source_hash=source_hash,
                              options=o, experts_without_tokens=unseen)


def plan_modules(model: "ModelConfig", algo: str, exclude: tuple[str, ...], group_size: int | None, *,
                 quantize_lm_head: bool = False) -> ModulePlan:
    """Which Linears get quantized; checks the exclusions and that the group size fits every one.

    The LM head is skipped unless `quantize_lm_head` (the caller has checked the head is not tied).
    """
    linears = linear_modules(model)
    names = [m.name for m in linears]
    warnings = []
    for pattern in exclude:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            warnings.append(f"--exclude {pattern!r} matches no Linear module (names look like "
                            "layers.0.mlp.down_proj or lm_head); it excluded nothing.")
    patterns = _exclusions(exclude, quantize_lm_head)
    skipped = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    for layer in range(model.num_layers):
        for block, projs, _ in FUSED_GROUPS:
            group = [f"layers.{layer}.{block}.{p}" for p in projs]
            out_of_group = [n for n in group if n in skipped]
            if out_of_group and len(out_of_group) != len(group):
                raise LlmxError(f"--exclude skips {out_of_group[0]} but not {next(n for n in group if n not in skipped)}: "
                                f"{'/'.join(projs)} are fused into one GEMM at build and must be quantized alike; "
                                f"exclude all of them (e.g. 'layers.{layer}.{block}.*') or none.")
    if algo == presets.KV_ONLY:
        return ModulePlan(quantized=[], skipped=names, warnings=warnings)
    quantized = [m for m in linears if m.name not in skipped]
    fixed_blocks = presets.PRESETS[algo].fixed_group_size is not None
    for m in quantized:
        if fixed_blocks:
            check_block_divides(m.in_features, m.name)
        elif group_size is not None:
            check_group_divides(m.in_features, group_size, m.name)
    return ModulePlan(quantized=[m.name for m in quantized], skipped=[n for n in names if n in skipped],
                      warnings=warnings)


def _in_features(model: "ModelConfig", plan: ModulePlan) -> dict[str, int]:
    """Input features of each Linear the plan quantizes."""
    quantized = set(plan.quantized)
    return {m.name: m.in_features for m in linear_modules(model) if m.name in quantized}


def _quant_config(algo: str, group: int | None, kv_cache_dtype: str | None, exclude: tuple[str, ...],
                  plan: ModulePlan, *, quantize_lm_head: bool = False) -> "QuantConfig":
    extra: dict[str, Any] = {}
    patterns = pre_quant_scale_patterns(algo)
    if patterns and any(fnmatch.fnmatchcase(n, p) for n in plan.quantized for p in patterns):
        extra[PRE_QUANT_SCALE_KEY] = patterns
    return QuantConfig(algo=algo, group_size=group, kv_cache_dtype=kv_cache_dtype,
                       exclude=_exclusions(exclude, quantize_lm_head), extra=extra)


def _exclusions(exclude: tuple[str, ...], quantize_lm_head: bool) -> tuple[str, ...]:
    """The module patterns left unquantized: the user's, plus lm_head unless it is to be quantized."""
    return tuple(dict.fromkeys((() if quantize_lm_head else DEFAULT_EXCLUDE) + tuple(exclude)))


def lm_head_exclusion(exclude) -> str | None:
    """The first exclude pattern that matches lm_head (and so contradicts quantizing it), or None."""
    return next((p for p in exclude or () if fnmatch.fnmatchcase(LM_HEAD, p)), None)


def _check_lm_head_options(quantize_lm_head: bool, algo: str, exclude: tuple[str, ...]) -> bool:
    """quantize_lm_head as a bool, refused with options that contradict it (before any heavy work)."""
    if not isinstance(quantize_lm_head, bool):
        raise LlmxError(f"quantize_lm_head must be true or false, got {quantize_lm_head!r}.")
    if not quantize_lm_head:
        return False
    if algo == presets.KV_ONLY:
        raise LlmxError("--quantize-lm-head quantizes the LM head in the weight format of --algo, and --algo none "
                        "quantizes no weights; choose an algorithm or drop --quantize-lm-head.")
    clash = lm_head_exclusion(exclude)
    if clash is not None:
        raise LlmxError(f"--exclude {clash!r} leaves lm_head unquantized and --quantize-lm-head quantizes it: the two "
                        "options contradict; drop one of them (a recipe's quantize.exclude counts as --exclude).")
    return True


def _check_untied_head(src: Path) -> None:
    """--quantize-lm-head needs a head of its own: read only the config (llmx.json or config.json)."""
    if src.is_dir() and not (src / CHECKPOINT_FILE).exists() and (src / "config.json").is_file():
        model, where, field = read_hf_config(src / "config.json")[1], src / "config.json", "tie_word_embeddings"
    else:
        model, where, field = read_checkpoint(src).model, src / CHECKPOINT_FILE, "model.tie_word_embeddings"
    if model.tie_word_embeddings:
        raise LlmxError(f"--quantize-lm-head: {where} sets `{field}` true: the model's LM head is its input embedding "
                        "matrix, which llmx keeps unquantized; drop --quantize-lm-head for this model.")


def _check_device(device: str) -> str:
    import torch

    if device == "cpu":
        return device
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise LlmxError(f"--device {device} needs a CUDA GPU, and torch sees none; use --device cpu.")
        return device
    raise LlmxError(f"--device {device!r} is not supported; use cpu, cuda or cuda:N.")


def _check_output(src: Path, out: Path, export_format: str, force: bool) -> None:
    markers = (CHECKPOINT_FILE,) if export_format == "llmx" else (HF_QUANT_CONFIG,)
    check_output_dir(out, force=force, marker_files=markers, inputs=(src,))


@contextlib.contextmanager
def _source_checkpoint(src: Path) -> Iterator["Checkpoint"]:
    """The llmx checkpoint at `src`; an unquantized HF folder is converted into a temporary one first."""
    if src.is_dir() and not (src / CHECKPOINT_FILE).exists() and (src / "config.json").is_file():
        if is_modelopt_checkpoint(src):
            raise LlmxError(f"{src} is already quantized (a ModelOpt checkpoint); `llmx convert` it to an llmx "
                            "checkpoint as it is, or quantize the unquantized model it was made from.")
        with tempfile.TemporaryDirectory(prefix="llmx-quantize-src-") as tmp:
            converted = convert(src, Path(tmp) / "checkpoint", dtype=_hf_dtype(src))
            yield read_checkpoint(converted)
        return
    yield read_checkpoint(src)


def _hf_dtype(hf_dir: Path) -> str:
    config = json.loads((hf_dir / "config.json").read_text())
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in SUPPORTED_DTYPES and dtype != "float32" else "bfloat16"


def _tokenizer(ckpt_dir: Path):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(ckpt_dir))
    except (OSError, ValueError) as exc:
        raise LlmxError(f"{ckpt_dir} has no usable tokenizer ({str(exc).splitlines()[0]}); calibration tokenizes "
                        "--calib-data with it: re-create the checkpoint from an HF folder with tokenizer files.") from None


def _load_model(ckpt: "Checkpoint", device: str, progress: Progress | None):
    """The calibration model and the sha256 of the source checkpoint (llmx.json + rank0), read in one pass."""
    hasher = hashlib.sha256((ckpt.path / CHECKPOINT_FILE).read_bytes())
    with SafetensorsFile.open(ckpt.rank_path(0)) as f:
        hasher.update(f.header_bytes)

        def tensors():
            for i, entry in enumerate(f.tensors):
                yield entry.name, f.read(entry.name, hasher)
                if progress is not None:
                    progress("load", i + 1, len(f.tensors))

        model = build_calibration_model(ckpt.model, ckpt.dtype, tensors(), device)
    return model, "sha256:" + hasher.hexdigest()


def _calibrate(model, algo: str, quant: "QuantConfig", plan: ModulePlan, calib, progress: Progress | None,
               gptq: "GptqSettings | None" = None, config: "ModelConfig | None" = None) -> dict[int, int] | None:
    """Calibrate `model` in place; for a mixture of experts (`config` with experts) return, per sparse layer, how
    many experts calibration routed no token to."""
    disabled = [_hf_module(n) for n in plan.skipped]
    head = LM_HEAD in plan.quantized
    mtq_config = presets.modelopt_config(algo, group_size=quant.group_size, kv_cache_dtype=quant.kv_cache_dtype,
                                         disabled_modules=disabled, quantize_lm_head=head)
    moe = config is not None and config.num_experts > 0
    if moe:
        mtq_config["quant_cfg"] += expert_quantizer_entries(mtq_config["quant_cfg"])
    use_cache = algo == presets.KV_ONLY or presets.PRESETS[algo].calib_use_cache
    loop = make_forward_loop(calib, use_cache=use_cache, progress=progress) if calib is not None else None
    if algo != presets.KV_ONLY and presets.PRESETS[algo].layerwise:
        # GPTQ is llmx's own (llmx.quant.gptq) in ModelOpt's layerwise pass: ModelOpt only inserts the quantizers.
        settings = gptq or GptqSettings()
        quantize_model(model, {**mtq_config, "algorithm": None}, loop)
        gptq_layerwise(model, loop, group_size=quant.group_size, settings=settings)
        if head:
            # The layerwise pass visits the decoder layers only: the head runs last, fed by the quantized model.
            gptq_module(model.get_submodule(_hf_module(LM_HEAD)), lambda _head: loop(model),
                        group_size=quant.group_size, settings=settings)
    else:
        counts = ExpertTokenCounts(model, config) if moe else None
        try:
            quantize_model(model, mtq_config, loop)
        finally:
            if counts is not None:
                counts.close()
    expected = sorted(_hf_module(n) for n in plan.quantized if expert_module(n) is None)
    got = sorted(quantized_linear_names(model))
    if got != expected:
        raise RuntimeError(f"ModelOpt quantized {got[:3]}... but llmx planned {expected[:3]}...: the preset "
                           f"patterns do not fit this transformers version")
    return counts.unseen() if moe else None


def _hf_module(llmx_module: str) -> str:
    return llmx_to_hf_name(f"{llmx_module}.weight").removesuffix(".weight")


class _LazyStates:
    """llmx module name -> LinearState, read from the calibrated model on access (one layer in memory)."""

    def __init__(self, model, names: list[str], config: "ModelConfig"):
        self._model, self._config = model, config
        self._experts = {n for n in names if expert_module(n) is not None}
        self._modules = {n: model.get_submodule(_hf_module(n)) for n in names if n not in self._experts}

    def __contains__(self, name: str) -> bool:
        return name in self._modules or name in self._experts

    def __getitem__(self, name: str) -> "LinearState":
        if name in self._experts:
            return read_expert_state(self._model, name, self._config)
        return read_linear_state(self._modules[name])


def _kv_amax(model, config: "ModelConfig", quant: "QuantConfig") -> dict:
    """layer -> (k amax, v amax) from the calibrated attention modules; empty without a quantized KV cache."""
    if quant.kv_cache_dtype is None:
        return {}
    return {i: read_kv_amax(model.get_submodule(f"model.layers.{i}.self_attn")) for i in range(config.num_layers)}


def _write_llmx(model, ckpt: "Checkpoint", quant: "QuantConfig", plan: ModulePlan, out: Path, provenance: dict,
                progress: Progress | None) -> None:
    specs = checkpoint_tensor_specs(ckpt.model, ckpt.dtype, quant)
    entries = [TensorEntry(name, spec.dtype, tuple(spec.shape)) for name, spec in specs.items()]
    states = _LazyStates(model, plan.quantized, ckpt.model)
    kv_amax = _kv_amax(model, ckpt.model, quant)
    with atomic_output_dir(out) as tmp, SafetensorsFile.open(ckpt.rank_path(0)) as source:
        with SafetensorsStreamWriter(rank_file(tmp, 0), entries) as writer:
            for name, tensor in export_tensors(ckpt.model, ckpt.dtype, quant, source=source.read, states=states,
                                               kv_amax=kv_amax, progress=progress):
                writer.write(name, tensor.contiguous())
        copy_files(find_tokenizer_files(ckpt.path, trust_remote_code=True), tmp)
        write_checkpoint_meta(tmp, ckpt.model, ckpt.dtype, quant, Mapping(), provenance)
        verify_tensors(rank_file(tmp, 0), specs)


def _write_hf(model, ckpt: "Checkpoint", out: Path) -> None:
    with atomic_output_dir(out) as tmp:
        export_hf(model, tmp, ckpt.dtype, find_tokenizer_files(ckpt.path, trust_remote_code=True))


def _provenance(src: Path, source_hash: str, calib, calib_data: str | None, calib_size: int, calib_seq_len: int,
                seed: int, recipe: str | None) -> dict:
    calibration = None
    if calib is not None:
        calibration = {"data": calib.source, "samples": calib.num_samples, "requested_samples": calib_size,
                       "seq_len": calib_seq_len, "seed": seed}
    return make_provenance(src.resolve(), source_hash, modelopt_version=modelopt_version(),
                           calib_data_hash=calib.data_hash if calib is not None else None, recipe=recipe,
                           calibration=calibration)


def _weights_size(out: Path) -> int:
    return sum(p.stat().st_size for p in Path(out).glob("*.safetensors"))
