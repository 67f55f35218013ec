"""What a pipeline run will do: a recipe resolved into each stage's options, every path absolute, checked.

Each stage's settings come from the same place as its command's: the command's default, overridden by the
recipe's section (the pipeline has no per-stage flags: the recipe file is where they change). Paths in
the recipe (model.source, quantize.calib_data, eval data and baselines, bench baselines and dataset) are
relative to the recipe file's folder, or to the current directory for a shipped recipe (`llama/h100`),
so a recipe committed next to its data works from any directory. A model source that is no existing path
but a hub model ID (ORG/NAME[@REVISION], llmx.ingest.hub) is fetched into the Hugging Face cache here.

Checks that span sections (a window or a request longer than the engine's max_seq_len, a calibrating
algorithm without data, a missing baseline file) happen here, before any stage runs, naming the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmx.bench.regression import gated_metrics, load_bench_baseline, load_eval_baseline
from llmx.common.errors import LlmxError
from llmx.common.limits import SETTING_LIMITS, out_of_range
from llmx.ingest.hub import download_model, parse_hub_id
from llmx.formats.presets import KV_ONLY, needs_calibration

# The recipe loader imports pydantic; it is imported inside the function that reads a recipe.

STAGES = ("convert", "quantize", "build", "eval", "bench")
# The file that marks an llmx checkpoint (llmx.formats.checkpoint.CHECKPOINT_FILE): such a source skips convert.
CHECKPOINT_MARKER = "llmx.json"
# Suffixes that make a calibration spec a file path rather than a hub dataset name (llmx.quant.calibrate).
_CALIB_FILE_SUFFIXES = (".txt", ".text", ".json", ".jsonl", ".parquet")


@dataclass(frozen=True)
class DatasetPlan:
    """One text to score and its gates."""

    name: str
    field: str  # where it came from in the recipe, for messages: "eval.datasets.0"
    data: Path
    seq_len: int
    windows: int | None  # None: every whole window of the file
    max_increase: float | None  # percent over the baseline, or over the reference without one
    max_perplexity: float | None
    baseline: Path | None

    @property
    def needs_reference(self) -> bool:
        """The increase gate is against the unquantized engine (scored by the eval stage) when no baseline is given."""
        return self.max_increase is not None and self.baseline is None


@dataclass(frozen=True)
class ScenarioPlan:
    """One benchmark workload and its gates."""

    name: str
    field: str
    isl: int
    osl: int
    num_requests: int | None  # None with a dataset: all of its lines
    concurrency: int | None
    request_rate: float | None
    warmup: int
    seed: int
    dataset: Path | None
    kv_cache_tokens: int | None
    kv_cache_fraction: float
    min_output_tok_s: float | None
    max_ttft_ms: float | None
    max_tpot_ms: float | None
    max_e2e_ms: float | None
    baseline: Path | None
    tolerance: float
    baseline_metrics: tuple[str, ...] | None  # None: every metric llmx bench --baseline compares

    def workload(self) -> dict[str, Any]:
        """What the measurement depends on (gate thresholds excluded: changing one re-judges, not re-measures)."""
        return {"isl": self.isl, "osl": self.osl, "num_requests": self.num_requests,
                "concurrency": self.concurrency, "request_rate": self.request_rate, "warmup": self.warmup,
                "seed": self.seed, "kv_cache_tokens": self.kv_cache_tokens,
                "kv_cache_fraction": self.kv_cache_fraction}


@dataclass(frozen=True)
class PipelinePlan:
    recipe: str  # display name, as in messages and provenance
    family: str
    target: str
    model: Path
    model_is_checkpoint: bool  # an llmx checkpoint: convert is skipped and the model is used as is
    workdir: Path
    convert: dict[str, Any]  # dtype, dummy_weights
    quantize: dict[str, Any] | None  # keyword arguments of llmx.quant.api.quantize; None: quantize is skipped
    quantize_skip_reason: str | None
    build: dict[str, Any]  # tp, pp and the BuildConfig fields
    eval_device: str | None  # None: the engine's own device
    datasets: tuple[DatasetPlan, ...]
    scenarios: tuple[ScenarioPlan, ...]


def make_plan(recipe_spec: str, *, defaults: dict[str, dict[str, Any]], model: str | Path | None = None,
              workdir: str | Path | None = None) -> PipelinePlan:
    """Resolve `recipe_spec` (a YAML path or a shipped `family/target`) into a checked PipelinePlan.

    defaults: each command's defaults ({"quantize": {...}, "build": {...}, ...}), the same the commands use.
    model: overrides the recipe's `model.source`. workdir: default `.llmx-work/pipeline/<recipe>`.
    """
    from llmx.recipes import find_recipe, load_recipe

    file, _ = find_recipe(recipe_spec)
    recipe, name = load_recipe(recipe_spec)
    # A recipe given as a file resolves its paths against its own folder; a shipped one lives inside the
    # installed package, next to no data, so the current directory is the only sensible base.
    base = file.resolve().parent if Path(recipe_spec).is_file() else Path.cwd()
    settings = {section: {**defaults[section], **recipe.section(section)}
                for section in ("convert", "quantize", "build", "eval", "bench")}
    for section in settings:
        _check_ranges(recipe.section(section), section, name)
    resolver = _Paths(base, name)

    source, is_checkpoint = _model_source(recipe, name, model, resolver)
    dummy = bool(recipe.model.dummy_weights)
    if dummy and is_checkpoint:
        raise LlmxError(f"{name}: `model.dummy_weights` makes random weights while converting a Hugging Face "
                        f"folder, but {source} is already an llmx checkpoint; drop the key or pass the HF folder.")
    build = _build_options(settings["build"])
    quantize, skip_reason = _quantize_options(settings["quantize"], name, resolver)
    datasets = _datasets(recipe, settings["eval"], build, name, resolver)
    scenarios = _scenarios(recipe, settings["bench"], build, name, resolver)
    eval_device = settings["eval"]["device"]
    return PipelinePlan(
        recipe=name, family=recipe.family, target=recipe.target, model=source, model_is_checkpoint=is_checkpoint,
        workdir=Path(workdir).resolve() if workdir is not None else default_workdir(recipe_spec),
        convert={"dtype": settings["convert"]["dtype"], "dummy_weights": dummy},
        quantize=quantize, quantize_skip_reason=skip_reason, build=build,
        eval_device=None if eval_device == "auto" else eval_device,
        datasets=tuple(datasets), scenarios=tuple(scenarios))


def default_workdir(recipe_spec: str) -> Path:
    """`.llmx-work/pipeline/<family>-<target>` for a shipped recipe, `.llmx-work/pipeline/<file stem>` for a file."""
    spec = Path(recipe_spec)
    label = spec.stem if spec.is_file() else str(recipe_spec).replace("/", "-")
    return (Path.cwd() / ".llmx-work" / "pipeline" / re.sub(r"[^A-Za-z0-9_.-]", "_", label)).resolve()


class _Paths:
    """Resolves the recipe's relative paths against its base folder, and names the field when one is missing."""

    def __init__(self, base: Path, recipe_name: str):
        self.base = base
        self.recipe = recipe_name

    def resolve(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.base / path).resolve()

    def existing_file(self, value: str, field: str, what: str) -> Path:
        path = self.resolve(value)
        if not path.is_file():
            raise LlmxError(f"{self.recipe}: `{field}` {value}: {path} is not a file; it should be {what} "
                            f"(relative paths start at {self.base}).")
        return path


def _model_source(recipe: Any, name: str, model: str | Path | None, paths: _Paths) -> tuple[Path, bool]:
    if model is not None:
        spec, source, origin = str(model), Path(model).expanduser().resolve(), "--model"
    elif recipe.model.source is not None:
        spec, source, origin = recipe.model.source, paths.resolve(recipe.model.source), f"`model.source` in {name}"
    else:
        raise LlmxError(f"no model to run: pass --model PATH (a Hugging Face folder, a hub model ID ORG/NAME or an "
                        f"llmx checkpoint) or set `model.source` in {name}.")
    if not source.exists():
        hub_id = parse_hub_id(spec)
        if hub_id is not None:  # fetched (or found in the hub cache) now: convert's key hashes its files
            return download_model(*hub_id).path, False
    if not source.is_dir():
        raise LlmxError(f"{origin}: {source} is not a directory; pass a Hugging Face model folder, a hub model ID "
                        "(ORG/NAME[@REVISION]) or an llmx checkpoint.")
    return source, (source / CHECKPOINT_MARKER).is_file()


def _resolve_device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _build_options(values: dict[str, Any]) -> dict[str, Any]:
    return {"tp": values["tp"], "pp": values["pp"], "max_batch_size": values["max_batch_size"],
            "max_seq_len": values["max_seq_len"], "max_num_tokens": values["max_num_tokens"],
            "kv_block_size": values["kv_block_size"], "device": _resolve_device(values["device"])}


def _quantize_options(values: dict[str, Any], name: str, paths: _Paths) -> tuple[dict[str, Any] | None, str | None]:
    algo, kv = values["algo"], values["kv_cache_dtype"]
    if algo is None:
        return None, "the recipe sets no quantize.algo"
    if algo == KV_ONLY and kv is None:
        return None, "quantize.algo is none and no kv_cache_dtype is set"
    if values["export_format"] != "llmx":
        raise LlmxError(f"{name}: `quantize.export_format` {values['export_format']} writes a Hugging Face folder, "
                        "which `llmx build` does not read; the pipeline needs export_format llmx (drop the key).")
    calib = values["calib_data"]
    if needs_calibration(algo, kv):
        if calib is None:
            what = f"`quantize.algo` {algo}" if algo != KV_ONLY else f"`quantize.kv_cache_dtype` {kv}"
            raise LlmxError(f"{name}: {what} calibrates on data; set `quantize.calib_data` to a text file (relative "
                            f"to {paths.base}) or a hub dataset name.")
        calib = _calibration_source(calib, name, paths)
    else:
        calib = None  # weight-only formats read no data: a stale calib_data must not re-run them
    return {"algo": algo, "kv_cache_dtype": kv, "calib_data": calib, "calib_size": values["calib_size"],
            "calib_seq_len": values["calib_seq_len"], "batch_size": values["batch_size"],
            "group_size": values["group_size"], "exclude": tuple(values["exclude"]),
            "device": _resolve_device(values["device"]), "seed": values["seed"],
            "quantize_lm_head": values["quantize_lm_head"],
            # int4_gptq's settings, passed only when set: stage keys of recipes without them stay as they were.
            **{k: values[k] for k in ("gptq_damp", "gptq_block_size", "gptq_act_order") if values.get(k) is not None}
            }, None


def _calibration_source(value: str, name: str, paths: _Paths) -> str:
    """An existing file or folder (absolute path), else a hub dataset name as written."""
    path = paths.resolve(value)
    if path.exists():
        return str(path)
    if Path(value).suffix.lower() in _CALIB_FILE_SUFFIXES or value.startswith((".", "/", "~")):
        raise LlmxError(f"{name}: `quantize.calib_data` {value}: {path} does not exist; pass an existing text file "
                        f"(relative paths start at {paths.base}) or a hub dataset name.")
    return value


def _datasets(recipe: Any, values: dict[str, Any], build: dict[str, Any], name: str,
              paths: _Paths) -> list[DatasetPlan]:
    section_increase = recipe.eval.max_increase  # only an explicit value turns on the reference gate
    declared = list(recipe.eval.datasets or ())
    if declared:
        entries = [{**d.given(), "field": f"eval.datasets.{i}"} for i, d in enumerate(declared)]
    elif recipe.eval.data is not None:
        # A recipe written for `llmx eval --recipe`: its one text, under the file's name.
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(recipe.eval.data).stem) or "data"
        entries = [{"name": stem, "data": recipe.eval.data, "field": "eval.data"}]
    else:
        return []
    plans = []
    for entry in entries:
        field = entry["field"]
        _check_ranges(entry, field, name)
        data_field = field if field == "eval.data" else f"{field}.data"
        seq_len = entry.get("seq_len", values["seq_len"])
        if seq_len > build["max_seq_len"]:
            raise LlmxError(f"{name}: `{field}` scores windows of {seq_len} tokens but `build.max_seq_len` is "
                            f"{build['max_seq_len']}; lower seq_len or raise max_seq_len.")
        baseline = None
        if entry.get("baseline") is not None:
            baseline = paths.existing_file(entry["baseline"], f"{field}.baseline",
                                           "an `llmx eval --json` result on the same text, seq_len and windows")
            _check_schema(baseline, "llmx-eval/1", f"{name}: `{field}.baseline`")
        max_increase = entry.get("max_increase", section_increase)
        if baseline is not None and max_increase is None:
            max_increase = values["max_increase"]  # `llmx eval --baseline` without --max-increase
        plans.append(DatasetPlan(
            name=entry["name"], field=field,
            data=paths.existing_file(entry["data"], data_field, "a UTF-8 text file to score"),
            seq_len=seq_len, windows=entry.get("windows", values["windows"]), max_increase=max_increase,
            max_perplexity=entry.get("max_perplexity"), baseline=baseline))
    return plans


def _scenarios(recipe: Any, values: dict[str, Any], build: dict[str, Any], name: str,
               paths: _Paths) -> list[ScenarioPlan]:
    declared = list(recipe.bench.scenarios or ())
    shared = dict(seed=values["seed"], kv_cache_tokens=values["kv_cache_tokens"],
                  kv_cache_fraction=values["kv_cache_fraction"])
    if declared:
        if values["dataset"] is not None:
            raise LlmxError(f"{name}: `bench.dataset` is for `llmx bench --recipe`; the pipeline's "
                            "`bench.scenarios` are synthetic (isl/osl): drop one of the two.")
        entries = [{**s.given(), "field": f"bench.scenarios.{i}"} for i, s in enumerate(declared)]
    elif any(key in recipe.bench.given() for key in ("isl", "osl", "num_requests", "dataset")):
        # A recipe written for `llmx bench --recipe`: its one workload, measured without gates.
        entries = [{"name": "default", "field": "bench", "isl": values["isl"], "osl": values["osl"],
                    "num_requests": values["num_requests"], "concurrency": values["concurrency"],
                    "request_rate": values["request_rate"], "dataset": values["dataset"]}]
    else:
        return []
    plans = []
    for entry in entries:
        field = entry["field"]
        _check_ranges(entry, field, name)
        dataset = None
        if entry.get("dataset") is not None:
            dataset = paths.existing_file(entry["dataset"], "bench.dataset", "a jsonl file of prompts")
        num_requests = entry.get("num_requests")
        if dataset is not None and "num_requests" not in recipe.bench.given():
            num_requests = None  # a dataset runs whole unless the recipe asks for a count
        if dataset is None and entry["isl"] + entry["osl"] > build["max_seq_len"]:
            raise LlmxError(f"{name}: `{field}` needs {entry['isl']} input + {entry['osl']} output tokens per request "
                            f"but `build.max_seq_len` is {build['max_seq_len']}; shorten it or raise max_seq_len.")
        if entry.get("max_tpot_ms") is not None and entry["osl"] < 2:
            raise LlmxError(f"{name}: `{field}.max_tpot_ms` needs osl >= 2 (TPOT is the time between output tokens).")
        baseline = None
        if entry.get("baseline") is not None:
            baseline = paths.existing_file(entry["baseline"], f"{field}.baseline",
                                           "an `llmx bench --json` report of the same workload")
            _check_schema(baseline, "llmx-bench/1", f"{name}: `{field}.baseline`")
        metrics = entry.get("baseline_metrics")
        if metrics is not None:
            _check_metric_names(metrics, f"{name}: `{field}.baseline_metrics`")
            metrics = tuple(metrics)
        plans.append(ScenarioPlan(
            name=entry["name"], field=field, isl=entry["isl"], osl=entry["osl"], num_requests=num_requests,
            concurrency=entry.get("concurrency"), request_rate=entry.get("request_rate"),
            warmup=entry.get("warmup", values["warmup"]), dataset=dataset, **shared,
            min_output_tok_s=entry.get("min_output_tok_s"), max_ttft_ms=entry.get("max_ttft_ms"),
            max_tpot_ms=entry.get("max_tpot_ms"), max_e2e_ms=entry.get("max_e2e_ms"), baseline=baseline,
            tolerance=entry.get("tolerance", values["tolerance"]), baseline_metrics=metrics))
    return plans


def _check_ranges(values: dict[str, Any], field: str, name: str) -> None:
    """The numbers of one recipe section or entry within their ranges (common.limits), as the commands check."""
    problem = out_of_range(values, SETTING_LIMITS)
    if problem is not None:
        raise LlmxError(f"{name}: `{field}.{problem[0]}` {problem[1]}.")


def _check_metric_names(names: list[str], where: str) -> None:
    known = list(gated_metrics({}))
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise LlmxError(f"{where} {unknown or names}: name metrics the bench baseline gate compares: "
                        f"{', '.join(known)}.")


def _check_schema(path: Path, schema: str, where: str) -> None:
    """Refuse a baseline that is malformed (wrong kind, missing or non-finite values) now, not after every
    stage has run: the same checks `llmx eval --baseline` and `llmx bench --baseline` make."""
    load = load_eval_baseline if schema == "llmx-eval/1" else load_bench_baseline
    try:
        load(path)
    except LlmxError as exc:
        raise LlmxError(f"{where}: {exc.message}") from None
