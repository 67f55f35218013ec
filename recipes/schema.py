"""The recipe format: one YAML file per model family and deployment target, validated by pydantic.

A recipe holds the settings of every stage, keyed exactly like the command-line options of that stage
(`build: {max_batch_size: 256}` is `llmx build --max-batch-size 256`). Every field is optional: an absent
field falls back to the command's default, and a flag given on the command line overrides the recipe.
Unknown keys are refused, so a typo never silently turns into a default.

Besides the shape, a recipe is checked against its target's hardware: FP8 formats (the algorithms whose row in
llmx.formats.presets.PRESETS says `needs_fp8`) need FP8 tensor cores (compute capability 8.9+), so
`quantize.algo: fp8` on an A100 is refused naming the field.

`llmx pipeline` reads three more things, which no single command has a flag for: `model` (where the
model comes from), `eval.datasets` (texts to score, each with its perplexity gates) and `bench.scenarios`
(workloads to measure, each with its throughput/latency gates). They live on PipelineEvalSection and
PipelineBenchSection, subclasses of the command sections, so SECTIONS keeps holding exactly the keys that
mirror each command's flags. Relative paths in these lists are resolved by the pipeline against the
recipe file's folder (the current directory for a shipped recipe), never here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llmx.formats.config import FP8_MIN_COMPUTE_CAPABILITY
from llmx.formats.presets import algos_without_fp8, fp8_algos

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class Target:
    """A deployment target: the device kind engines run on and, for GPUs, the compute capability."""

    name: str
    device: str  # "cpu" | "cuda"
    compute_capability: tuple[int, int] | None
    description: str


TARGETS: dict[str, Target] = {
    "cpu": Target("cpu", "cpu", None, "any CPU, through the pure-torch path"),
    "a100": Target("a100", "cuda", (8, 0), "NVIDIA A100 (Ampere, sm80): no FP8 tensor cores"),
    "h100": Target("h100", "cuda", (9, 0), "NVIDIA H100 (Hopper, sm90)"),
    "h200": Target("h200", "cuda", (9, 0), "NVIDIA H200 (Hopper, sm90, 141 GB HBM3e)"),
}

class _Section(BaseModel):
    # strict: YAML `tp: "2"` or `chat: 1` is a mistake worth reporting, not something to coerce.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    def given(self) -> dict[str, Any]:
        """The fields the recipe sets (absent ones are None and fall back to the command's defaults)."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Device = Literal["cpu", "cuda", "auto"]


class ConvertSection(_Section):
    dtype: Literal["bfloat16", "float16", "float32"] | None = None


class QuantizeSection(_Section):
    algo: str | None = None
    kv_cache_dtype: Literal["fp8", "int8"] | None = None
    calib_data: str | None = None
    calib_size: PositiveInt | None = None
    calib_seq_len: PositiveInt | None = None
    batch_size: PositiveInt | None = None
    group_size: PositiveInt | None = None
    exclude: list[str] | None = None
    device: Device | None = None
    seed: NonNegativeInt | None = None
    export_format: Literal["llmx", "hf"] | None = None
    quantize_lm_head: bool | None = None
    gptq_damp: Annotated[float, Field(gt=0, le=1)] | None = None  # int4_gptq only (llmx.quant.gptq)
    gptq_block_size: PositiveInt | None = None
    gptq_act_order: bool | None = None


class BuildSection(_Section):
    tp: PositiveInt | None = None
    pp: PositiveInt | None = None
    max_batch_size: PositiveInt | None = None
    max_seq_len: PositiveInt | None = None
    max_num_tokens: PositiveInt | None = None
    kv_block_size: PositiveInt | None = None
    device: Device | None = None


class RunSection(_Section):
    max_new_tokens: PositiveInt | None = None
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_k: NonNegativeInt | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: NonNegativeInt | None = None
    stop: list[str] | None = None
    min_tokens: NonNegativeInt | None = None
    ignore_eos: bool | None = None
    # The ranges of runtime.sequence.SamplingParams (OpenAI's for the penalties and logprobs).
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    n: PositiveInt | None = None
    chat: bool | None = None
    kv_cache_tokens: PositiveInt | None = None
    kv_cache_fraction: Annotated[float, Field(gt=0, le=1)] | None = None


class BenchSection(_Section):
    isl: PositiveInt | None = None
    osl: PositiveInt | None = None
    num_requests: PositiveInt | None = None
    concurrency: PositiveInt | None = None
    request_rate: Annotated[float, Field(gt=0)] | None = None
    warmup: NonNegativeInt | None = None
    dataset: str | None = None
    seed: NonNegativeInt | None = None
    tolerance: Annotated[float, Field(ge=0)] | None = None
    kv_cache_tokens: PositiveInt | None = None
    kv_cache_fraction: Annotated[float, Field(gt=0, le=1)] | None = None


class EvalSection(_Section):
    data: str | None = None
    seq_len: Annotated[int, Field(ge=2)] | None = None
    windows: PositiveInt | None = None
    max_increase: Annotated[float, Field(ge=0)] | None = None
    device: Device | None = None


# Dataset and scenario names become output file names (eval/<name>.json) and gate names.
OutputName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)]
Percent = Annotated[float, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


class ModelSection(_Section):
    """Where `llmx pipeline` takes the model from (`--model` overrides `source`)."""

    source: str | None = None  # HF folder or llmx checkpoint; relative to the recipe file's folder
    dummy_weights: bool | None = None


class EvalDataset(_Section):
    """One text the pipeline scores, and the perplexity gates on it.

    Unset seq_len / windows / max_increase fall back to the `eval` section's values. The increase is in
    percent over `baseline` (a committed `llmx eval --json` result) when given, else over the reference:
    the same windows scored on an engine of the unquantized checkpoint built with the same options.
    """

    name: OutputName
    data: str
    seq_len: Annotated[int, Field(ge=2)] | None = None
    windows: PositiveInt | None = None
    max_increase: Percent | None = None
    max_perplexity: PositiveFloat | None = None
    baseline: str | None = None


class BenchScenario(_Section):
    """One workload the pipeline benchmarks, and its gates (latencies are means over the requests).

    `baseline` is a committed `llmx bench --json` report of the same workload, gated with `tolerance`
    percent (else the `bench` section's tolerance) as `llmx bench --baseline` does, on `baseline_metrics`.
    """

    name: OutputName
    isl: PositiveInt
    osl: PositiveInt
    num_requests: PositiveInt
    concurrency: PositiveInt | None = None
    request_rate: PositiveFloat | None = None
    warmup: NonNegativeInt | None = None
    min_output_tok_s: PositiveFloat | None = None
    max_ttft_ms: PositiveFloat | None = None
    max_tpot_ms: PositiveFloat | None = None
    max_e2e_ms: PositiveFloat | None = None
    baseline: str | None = None
    tolerance: Percent | None = None
    # Which metrics the baseline gate compares (e.g. [output_throughput_tok_s, ttft_ms.p50]); default: every
    # one `llmx bench --baseline` compares. Noisy runners (shared CPUs) gate the robust ones only.
    baseline_metrics: list[str] | None = None


class PipelineEvalSection(EvalSection):
    datasets: list[EvalDataset] | None = None


class PipelineBenchSection(BenchSection):
    scenarios: list[BenchScenario] | None = None


class Recipe(_Section):
    """A whole recipe file. `family` and `target` say what it was tuned for; every section is optional."""

    family: Literal[FAMILIES]
    target: Literal[tuple(TARGETS)]
    description: str | None = None
    model: ModelSection = ModelSection()
    convert: ConvertSection = ConvertSection()
    quantize: QuantizeSection = QuantizeSection()
    build: BuildSection = BuildSection()
    run: RunSection = RunSection()
    bench: PipelineBenchSection = PipelineBenchSection()
    eval: PipelineEvalSection = PipelineEvalSection()

    def section(self, name: str) -> dict[str, Any]:
        """Settings the recipe gives for one command (`convert`, `quantize`, `build`, `run`, `bench`, `eval`).

        Only the keys that mirror the command's flags: the pipeline's lists (`eval.datasets`,
        `bench.scenarios`) are read from the section objects themselves.
        """
        given = getattr(self, name).given()
        return {key: value for key, value in given.items() if key in SECTIONS[name].model_fields}


# The sections whose keys mirror one command's flags: what `--recipe` feeds each command.
SECTIONS: dict[str, type[_Section]] = {
    "convert": ConvertSection,
    "quantize": QuantizeSection,
    "build": BuildSection,
    "run": RunSection,
    "bench": BenchSection,
    "eval": EvalSection,
}


def target_conflict(target_name: str, section: str, key: str, value: Any) -> str | None:
    """Why `section.key = value` cannot work on the target, or None when it can.

    Only hardware facts are checked here: FP8 formats on GPUs older than compute capability 8.9, and an
    engine device that is not the target's device.
    """
    target = TARGETS[target_name]
    if value is None:
        return None
    if section == "quantize" and key in ("algo", "kv_cache_dtype") and target.compute_capability is not None:
        needs_fp8 = (key == "algo" and value in fp8_algos()) or (key == "kv_cache_dtype" and value == "fp8")
        if needs_fp8 and target.compute_capability < FP8_MIN_COMPUTE_CAPABILITY:
            cc = ".".join(map(str, target.compute_capability))
            return (f"{value} needs FP8 support (compute capability 8.9+) but target {target.name} is {cc}; "
                    f"use {_either(algos_without_fp8())} weights and an int8 KV cache there")
    if section in ("build", "eval") and key == "device" and value not in ("auto", target.device):
        return f"target {target.name} runs engines on {target.device}, not {value}"
    return None


def _either(names: tuple[str, ...]) -> str:
    """"a, b or c"."""
    return " or ".join(filter(None, (", ".join(names[:-1]), names[-1])))
