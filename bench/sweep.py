"""A sweep: several ISL/OSL cells in one run, each next to a peer's published figure (`llmx bench --sweep FILE`).

The sweep file (YAML or JSON) names the peer and lists the cells:

    peer: TensorRT-LLM 1.0, FP8, 1x H100 SXM 80GB        # who the figures are from
    source: https://...                                   # where they were published
    cells:
      - {isl: 128, osl: 128, num_requests: 30000, peer_output_tok_s: 28312}
      - {isl: 2048, osl: 2048, num_requests: 1500, max_batch: 512, peer_output_tok_s: 9305}

Each cell runs like `llmx bench --isl --osl --num-requests` with every request sent at once (the peers' offline
throughput scenario). `max_batch` (optional) runs at most that many sequences at once, at most the engine's
max batch size. `peer_num_requests` (optional, default num_requests) records how many requests the peer ran,
when a cell runs fewer. Each cell starts on an empty scheduler and prefix cache, so no cell hits the prompts
of the one before. The report (`llmx-bench-sweep/1`) keeps, per cell, the workload, llmx's metrics, the peer's
figure and the ratio llmx / peer of output tokens per second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from llmx.bench.report import engine_description, environment_description
from llmx.bench.runner import BenchOptions, measure
from llmx.common.errors import LlmxError
from llmx.runtime.block_manager import BlockManager
from llmx.runtime.scheduler import Scheduler

SCHEMA = "llmx-bench-sweep/1"
_CELL_FIELDS = {"isl", "osl", "num_requests", "max_batch", "peer_output_tok_s", "peer_num_requests"}


@dataclass(frozen=True)
class SweepCell:
    isl: int
    osl: int
    num_requests: int
    peer_output_tok_s: float
    max_batch: int | None = None  # None: the engine's max batch size
    peer_num_requests: int | None = None  # None: as many as this cell runs

    @property
    def name(self) -> str:
        return f"{self.isl}/{self.osl}"


@dataclass(frozen=True)
class Sweep:
    peer: str
    source: str | None
    cells: tuple[SweepCell, ...]
    path: Path


def load_sweep(path: Path) -> Sweep:
    """Read and check a sweep file; every problem is one sentence naming the file and the field."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise LlmxError(f"{path}: no such sweep file; pass a YAML or JSON file listing the cells "
                        "(see measurements/peers/ for one).") from exc
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise LlmxError(f"{path}: not a readable YAML/JSON sweep file ({exc}).") from exc
    if not isinstance(doc, dict):
        raise LlmxError(f"{path}: a sweep file is a mapping with `peer` and `cells`; got {type(doc).__name__}.")
    peer, source, cells = doc.get("peer"), doc.get("source"), doc.get("cells")
    if not isinstance(peer, str) or not peer.strip():
        raise LlmxError(f"{path}: `peer` must name whose figures these are, e.g. \"TensorRT-LLM 1.0, FP8, 1x H100\".")
    if source is not None and not isinstance(source, str):
        raise LlmxError(f"{path}: `source` must be a string (where the peer's figures were published).")
    unknown = sorted(set(doc) - {"peer", "source", "cells"})
    if unknown:
        raise LlmxError(f"{path}: unknown top-level field(s) {', '.join(unknown)}; a sweep file has peer, source "
                        "and cells.")
    if not isinstance(cells, list) or not cells:
        raise LlmxError(f"{path}: `cells` must be a non-empty list of {{isl, osl, num_requests, peer_output_tok_s}}.")
    return Sweep(peer.strip(), source, tuple(_cell(path, i, c) for i, c in enumerate(cells, 1)), path)


def _cell(path: Path, index: int, raw: Any) -> SweepCell:
    where = f"{path}: cell {index}"
    if not isinstance(raw, dict):
        raise LlmxError(f"{where} must be a mapping like {{isl: 128, osl: 128, num_requests: 1000, "
                        "peer_output_tok_s: 28312}}.")
    unknown = sorted(set(raw) - _CELL_FIELDS)
    if unknown:
        raise LlmxError(f"{where}: unknown field(s) {', '.join(unknown)}; a cell has {', '.join(sorted(_CELL_FIELDS))}.")

    def integer(name: str, required: bool = True) -> int | None:
        value = raw.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise LlmxError(f"{where}: `{name}` must be a positive integer, got {value!r}.")
        return value

    peer = raw.get("peer_output_tok_s")
    if isinstance(peer, bool) or not isinstance(peer, (int, float)) or not math.isfinite(peer) or peer <= 0:
        raise LlmxError(f"{where}: `peer_output_tok_s` must be the peer's positive output tokens per second, "
                        f"got {peer!r}.")
    return SweepCell(isl=integer("isl"), osl=integer("osl"), num_requests=integer("num_requests"),
                     peer_output_tok_s=float(peer), max_batch=integer("max_batch", required=False),
                     peer_num_requests=integer("peer_num_requests", required=False))


def check_sweep_fits(sweep: Sweep, *, max_batch_size: int, max_seq_len: int) -> None:
    """Refuse, before anything runs, a cell the engine cannot run as written."""
    for i, cell in enumerate(sweep.cells, 1):
        if cell.max_batch is not None and cell.max_batch > max_batch_size:
            raise LlmxError(f"{sweep.path}: cell {i} ({cell.name}) asks for max_batch {cell.max_batch} but the "
                            f"engine's max batch size is {max_batch_size}; lower the cell's max_batch or rebuild "
                            f"with `llmx build --max-batch-size {cell.max_batch}`.")
        if cell.isl + cell.osl > max_seq_len:
            raise LlmxError(f"{sweep.path}: cell {i} ({cell.name}) needs {cell.isl + cell.osl} tokens per sequence "
                            f"but the engine's max_seq_len is {max_seq_len}; rebuild with a larger --max-seq-len.")


def fresh_scheduler(llm: Any, *, max_batch: int | None = None, admission: str | None = None,
                    watermark: float | None = None) -> None:
    """Give an idle LLM a new scheduler and block manager (empty prefix cache), optionally with fewer seats
    than its engine was built for, or another admission policy (and watermark). The KV tensors and CUDA graphs
    are kept."""
    old = llm.scheduler
    if old.has_unfinished():
        raise RuntimeError("fresh_scheduler needs an idle LLM: requests are still waiting or running")
    built = llm.engine.build.max_batch_size if llm.engine is not None else old.max_num_seqs
    llm.block_manager = BlockManager(old.block_manager.num_blocks, old.block_size,
                                     enable_prefix_caching=old.block_manager.enable_prefix_caching)
    llm.scheduler = Scheduler(llm.block_manager, max_num_seqs=max_batch or built, max_num_tokens=old.max_num_tokens,
                              max_model_len=old.max_model_len, block_size=old.block_size,
                              eos_token_ids=old.eos_token_ids, chunked_prefill=old.chunked_prefill,
                              admission=admission or old.admission,
                              **({"watermark": watermark} if watermark is not None else {}))


def run_sweep(llm: Any, sweep: Sweep, *, warmup: int = 2, seed: int = 0,
              progress: Callable[[str, int, int], None] | None = None,
              on_cell: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run every cell of `sweep` on `llm` and return the `llmx-bench-sweep/1` report.

    on_cell(report): called after each cell with the report of the cells finished so far, so a run that is
    stopped (a time limit, Ctrl-C) keeps the figures it measured.
    """
    engine = llm.engine
    check_sweep_fits(sweep, max_batch_size=engine.build.max_batch_size, max_seq_len=llm.max_seq_len)
    results: list[dict[str, Any]] = []

    def report() -> dict[str, Any]:
        return {"schema": SCHEMA, "engine": engine_description(engine),
                "peer": {"name": sweep.peer, "source": sweep.source, "file": str(sweep.path)},
                "cells": list(results), "cells_planned": len(sweep.cells),
                "environment": environment_description(llm.stats())}

    for i, cell in enumerate(sweep.cells, 1):
        fresh_scheduler(llm, max_batch=cell.max_batch)
        options = BenchOptions(isl=cell.isl, osl=cell.osl, num_requests=cell.num_requests, warmup=warmup, seed=seed)
        try:
            metrics = measure(llm, options, progress=progress, stage=f"cell {i}/{len(sweep.cells)} {cell.name}:")
        except LlmxError as exc:
            raise LlmxError(f"{sweep.path}: cell {i} ({cell.name}): {exc}") from exc
        ours = metrics["output_throughput_tok_s"]
        results.append({
            "isl": cell.isl, "osl": cell.osl, "num_requests": cell.num_requests,
            "max_batch": llm.scheduler.max_num_seqs, "warmup": warmup, "seed": seed,
            "peer_output_tok_s": cell.peer_output_tok_s,
            "peer_num_requests": cell.peer_num_requests or cell.num_requests,
            "ratio": ours / cell.peer_output_tok_s if ours is not None else None,
            "metrics": metrics,
        })
        if on_cell is not None:
            on_cell(report())
    return report()


def print_sweep(console: Any, report: dict[str, Any]) -> None:
    """One row per cell: llmx's output tok/s next to the peer's, the ratio, latency and preemptions."""
    from rich.table import Table

    peer = report["peer"]["name"]
    table = Table(title=f"llmx bench sweep: {report['engine']['path']} against {peer}", title_justify="left")
    for column in ("ISL/OSL", "requests", "max batch", "llmx tok/s", "peer tok/s", "ratio", "TTFT p50 ms",
                   "TPOT mean ms", "preemptions"):
        table.add_column(column, justify="left" if column == "ISL/OSL" else "right")
    for cell in report["cells"]:
        m = cell["metrics"]
        requests = f"{cell['num_requests']:,}"
        if cell["peer_num_requests"] != cell["num_requests"]:
            requests += f" (peer {cell['peer_num_requests']:,})"
        table.add_row(f"{cell['isl']}/{cell['osl']}", requests, str(cell["max_batch"]),
                      _number(m["output_throughput_tok_s"], 0), _number(cell["peer_output_tok_s"], 0),
                      _number(cell["ratio"], 2), _number((m.get("ttft_ms") or {}).get("p50"), 1),
                      _number((m.get("tpot_ms") or {}).get("mean"), 2), str(m.get("num_preemptions")))
    console.print(table)
    if report["peer"]["source"]:
        console.print(f"peer figures: {report['peer']['source']}")


def cell_line(report: dict[str, Any]) -> str:
    """One line for the report's last finished cell: its figure next to the peer's, with the ratio."""
    cell = report["cells"][-1]
    done, planned = len(report["cells"]), report["cells_planned"]
    return (f"cell {done}/{planned} {cell['isl']}/{cell['osl']} x{cell['num_requests']:,}: "
            f"{_number(cell['metrics']['output_throughput_tok_s'], 0)} output tok/s, peer "
            f"{_number(cell['peer_output_tok_s'], 0)}, ratio {_number(cell['ratio'], 2)}")


def _number(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"
