"""The five stages, each a call into the library (no subprocesses), writing its output completely or not at all.

convert, quantize and build write through atomic_output_dir inside the library; eval and bench gather
their JSON files in a temporary folder renamed over WORKDIR/eval or WORKDIR/bench only when every
dataset or scenario is done. A stage that fails therefore leaves the previous complete output (if any)
and every earlier stage's output untouched. Each function returns the summary recorded and shown.

progress: None or a `progress(stage, done, total)` sink (llmx.common.progress), relabelled per stage.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any, Iterator

from llmx.bench.report import write_report
from llmx.bench.runner import BenchOptions, run_benchmark
from llmx.common.atomic import atomic_output_dir
from llmx.common.jsonio import dumps
from llmx.common.progress import Progress, relabel
from llmx.eval.perplexity import evaluate_perplexity
from llmx.formats.config import BuildConfig, Mapping
from llmx.pipeline.plan import DatasetPlan, PipelinePlan, ScenarioPlan
from llmx.pipeline.workdir import Workdir

# The llmx modules that import torch are imported inside the functions that use them, so importing this
# module does not load torch.


def run_convert(plan: PipelinePlan, work: Workdir, progress: Progress | None) -> dict[str, Any]:
    from llmx.ingest.convert import convert

    out = convert(plan.model, work.output("convert"), dtype=plan.convert["dtype"],
                  dummy_weights=plan.convert["dummy_weights"], force=True,
                  progress=progress)
    return _checkpoint_summary(Path(out))


def run_quantize(plan: PipelinePlan, work: Workdir, source: Path, progress: Progress | None) -> dict[str, Any]:
    from llmx.quant.api import quantize

    assert plan.quantize is not None
    labelled = relabel(progress, "quantize")
    result = quantize(source, work.output("quantize"), **plan.quantize, export_format="llmx", force=True,
                      recipe=plan.recipe, progress=labelled)
    return {"algo": result.algo, "kv_cache_dtype": plan.quantize["kv_cache_dtype"],
            "quantized_modules": len(result.quantized_modules), "skipped_modules": list(result.skipped_modules),
            "size_before_bytes": result.size_before_bytes, "size_after_bytes": result.size_after_bytes,
            "calib_data_hash": result.calib_data_hash, "warnings": list(result.warnings)}


def run_build(plan: PipelinePlan, work: Workdir, checkpoint: Path, progress: Progress | None) -> dict[str, Any]:
    result = _build(plan, checkpoint, work.output("build"), progress)
    return {"path": str(result.path), "device": plan.build["device"], "tp": plan.build["tp"], "pp": plan.build["pp"],
            "max_batch_size": plan.build["max_batch_size"], "max_seq_len": plan.build["max_seq_len"]}


def run_eval(plan: PipelinePlan, work: Workdir, engine: Path, unquantized: Path, reference_keys: dict[str, str],
             progress: Progress | None) -> dict[str, Any]:
    """Score every dataset on the engine, and on the unquantized reference where a gate needs it.

    A reference result carries its key (`pipeline_key`); one whose key is unchanged is carried over from the
    previous eval output instead of building and scoring the reference engine again (it depends only on
    convert, the build options and the dataset, not on quantize).
    """
    old_dir = work.output("eval")
    summary: dict[str, Any] = {}
    with contextlib.ExitStack() as stack, atomic_output_dir(old_dir) as tmp:
        reference_engine: Path | None = None
        for dataset in plan.datasets:
            result = _score(engine, dataset, plan.eval_device, progress, f"eval {dataset.name}")
            _write_json(tmp / f"{dataset.name}.json", result)
            entry = {"perplexity": result["perplexity"], "windows": result["num_windows"],
                     "seq_len": result["seq_len"]}
            key = reference_keys.get(dataset.name)
            if key is not None:
                name = f"reference-{dataset.name}.json"
                reference = _read_json(old_dir / name)
                if reference is not None and reference.get("pipeline_key") == key:
                    entry["reference"] = "reused"
                else:
                    if reference_engine is None:
                        reference_engine = stack.enter_context(_reference_engine(plan, work, unquantized, progress))
                    reference = {**_score(reference_engine, dataset, plan.eval_device, progress,
                                          f"reference {dataset.name}"), "pipeline_key": key}
                    entry["reference"] = "scored"
                _write_json(tmp / name, reference)
                entry["reference_perplexity"] = reference["perplexity"]
            summary[dataset.name] = entry
    return {"datasets": summary}


def run_bench(plan: PipelinePlan, work: Workdir, engine: Path, progress: Progress | None) -> dict[str, Any]:
    """Benchmark every scenario on a freshly loaded engine each (no prefix cache or KV state carried over)."""
    summary = {}
    with atomic_output_dir(work.output("bench")) as tmp:
        for scenario in plan.scenarios:
            report = _benchmark(engine, scenario, plan.recipe, progress)
            write_report(report, tmp / f"{scenario.name}.json")
            m = report["metrics"]
            summary[scenario.name] = {"output_throughput_tok_s": m["output_throughput_tok_s"],
                                      "ttft_ms_mean": (m.get("ttft_ms") or {}).get("mean"),
                                      "tpot_ms_mean": (m.get("tpot_ms") or {}).get("mean"),
                                      "device": report["environment"]["device_name"]}
    return {"scenarios": summary}


def _build(plan: PipelinePlan, checkpoint: Path, out: Path, progress: Progress | None) -> Any:
    from llmx.build.engine import build_engine

    options = plan.build
    build = BuildConfig(max_batch_size=options["max_batch_size"], max_seq_len=options["max_seq_len"],
                        max_num_tokens=options["max_num_tokens"], kv_block_size=options["kv_block_size"],
                        device=options["device"])
    # force: the pipeline's own key already decided this build must run; build_engine's reuse check
    # (file stats) would otherwise keep an engine the pipeline considers stale.
    return build_engine(checkpoint, out, build, Mapping(tp=options["tp"], pp=options["pp"]), force=True,
                        recipe=plan.recipe, progress=progress)


@contextlib.contextmanager
def _reference_engine(plan: PipelinePlan, work: Workdir, unquantized: Path,
                      progress: Progress | None) -> Iterator[Path]:
    """An engine of the unquantized checkpoint with the pipeline's build options, deleted after scoring."""
    with tempfile.TemporaryDirectory(prefix="reference-", dir=work.meta) as scratch:
        yield _build(plan, unquantized, Path(scratch) / "engine", relabel(progress, "reference")).path


def _score(engine: Path, dataset: DatasetPlan, device: str | None, progress: Progress | None,
           label: str) -> dict[str, Any]:
    """An `llmx eval --json` result (schema llmx-eval/1), so it can serve as a committed baseline as is."""
    report = (lambda stage, done, total: progress(label, done, total)) if progress is not None else None
    try:
        result = evaluate_perplexity(engine, dataset.data, seq_len=dataset.seq_len, windows=dataset.windows,
                                     device=device, progress=report)
    finally:
        _release_device_memory()  # the scoring engine is gone; its cached blocks would shrink the next KV cache
    return {"schema": "llmx-eval/1", "path": str(engine), **result.to_dict()}


def _benchmark(engine: Path, scenario: ScenarioPlan, recipe: str, progress: Progress | None) -> dict[str, Any]:
    from llmx.runtime.engine import LLM

    options = BenchOptions(isl=scenario.isl, osl=scenario.osl, num_requests=scenario.num_requests,
                           concurrency=scenario.concurrency, request_rate=scenario.request_rate,
                           warmup=scenario.warmup, dataset=scenario.dataset, seed=scenario.seed,
                           kv_cache_tokens=scenario.kv_cache_tokens)
    llm = LLM(engine, kv_cache_tokens=scenario.kv_cache_tokens, kv_cache_fraction=scenario.kv_cache_fraction)
    try:
        return run_benchmark(llm, options, recipe=recipe, progress=relabel(progress, f"bench {scenario.name}"))
    finally:
        llm.close()
        del llm
        _release_device_memory()


def _release_device_memory() -> None:
    """Give the GPU memory of a finished engine back before the next one sizes its KV cache from what is free."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _checkpoint_summary(path: Path) -> dict[str, Any]:
    meta = json.loads((path / "llmx.json").read_text())
    model = meta["model"]
    return {"path": str(path), "family": model.get("family"), "architecture": model.get("architecture"),
            "num_layers": model.get("num_layers"), "hidden_size": model.get("hidden_size"), "dtype": meta["dtype"],
            "size_bytes": sum(f.stat().st_size for f in path.glob("rank*.safetensors"))}


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(dumps(doc) + "\n", encoding="utf-8")  # a NaN perplexity as null + `non_finite`


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None
