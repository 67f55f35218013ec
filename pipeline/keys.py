"""Each stage's cache key: a sha256 over everything its output depends on, and nothing else.

    key = sha256(JSON {llmx version, stage, resolved options, content hashes of its input files,
                       the key of the stage it reads from})

Chaining the upstream key means a change anywhere upstream (new calibration text -> new quantize key)
changes every key below it, without hashing the multi-GB intermediate outputs themselves. Gate
thresholds and baselines are not in any key: gates are judged again on every run from the stored
results, so tightening a threshold re-judges without re-measuring.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llmx
from llmx.common.hashing import hash_json
from llmx.pipeline.hash_cache import HashCache
from llmx.pipeline.plan import DatasetPlan, PipelinePlan


@dataclass(frozen=True)
class StageKeys:
    convert: str  # also when convert is skipped: the key of the given checkpoint, which later stages read
    quantize: str | None  # None: quantize is skipped and build reads convert's output
    build: str
    eval: str | None  # None: nothing to score
    bench: str | None  # None: nothing to benchmark
    references: dict[str, str]  # dataset name -> key of its score on the unquantized engine

    def of(self, stage: str) -> str | None:
        return getattr(self, stage)


def stage_key(stage: str, payload: dict[str, Any]) -> str:
    return hash_json({"llmx": llmx.__version__, "stage": stage, **payload})


def compute_keys(plan: PipelinePlan, hashes: HashCache) -> StageKeys:
    convert = stage_key("convert", {"options": plan.convert, "checkpoint_given": plan.model_is_checkpoint,
                                    "source": hashes.tree_hash(plan.model)})
    quantize = None
    if plan.quantize is not None:
        options = dict(plan.quantize)
        calib = options.pop("calib_data")
        options["exclude"] = list(options["exclude"])
        quantize = stage_key("quantize", {"options": options, "calib_data": _calibration_hash(calib, hashes),
                                          "upstream": convert})
    build = stage_key("build", {"options": plan.build, "upstream": quantize or convert})
    scored = {d.name: _scoring(d, hashes) for d in plan.datasets}
    references = {}
    if plan.quantize is not None:  # an unquantized engine has no reference other than itself
        references = {d.name: stage_key("eval-reference", {"dataset": scored[d.name], "device": plan.eval_device,
                                                           "build_options": plan.build, "upstream": convert})
                      for d in plan.datasets if d.needs_reference}
    eval_key = None
    if plan.datasets:
        eval_key = stage_key("eval", {"datasets": list(scored.values()), "device": plan.eval_device,
                                      "references": references, "upstream": build})
    bench = None
    if plan.scenarios:
        scenarios = [{"name": s.name, **s.workload(),
                      "dataset": hashes.file_hash(s.dataset) if s.dataset is not None else None}
                     for s in plan.scenarios]
        bench = stage_key("bench", {"scenarios": scenarios, "upstream": build})
    return StageKeys(convert=convert, quantize=quantize, build=build, eval=eval_key, bench=bench,
                     references=references)


def _scoring(dataset: DatasetPlan, hashes: HashCache) -> dict[str, Any]:
    """What a perplexity depends on. The file name is included because results record it in their data hash."""
    return {"name": dataset.name, "data_name": dataset.data.name, "data": hashes.file_hash(dataset.data),
            "seq_len": dataset.seq_len, "windows": dataset.windows}


def _calibration_hash(calib: str | None, hashes: HashCache) -> str | None:
    """Content hash of a local calibration file or folder; a hub dataset name stands for itself."""
    if calib is None:
        return None
    path = Path(calib)
    return hashes.path_hash(path) if path.exists() else f"hub:{calib}"
