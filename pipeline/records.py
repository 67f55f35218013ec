"""Stage records: `WORKDIR/.llmx-pipeline/<stage>.json`, written only once the stage's outputs are complete.

A record holds the stage's input key, when it finished and how long it took, its output files with their
sizes, and the summary shown to people. A later run reuses the stage only when the key is the same and
every recorded file is still there at its recorded size (a deleted or truncated output runs it again).
"""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from llmx.common.jsonio import dumps
from llmx.pipeline.workdir import Workdir, files_with_sizes, write_text_atomic

RECORD_FORMAT = "llmx-pipeline-record/1"


@dataclass(frozen=True)
class StageRecord:
    stage: str
    key: str
    finished_at: str  # ISO-8601 UTC
    seconds: float
    output: str  # relative to the workdir
    files: dict[str, int]  # relative path -> size in bytes
    summary: dict[str, Any] = field(default_factory=dict)

    def intact(self, work: Workdir) -> bool:
        """Every output file the stage wrote is still there at the size it had."""
        for relative, size in self.files.items():
            path = work.root / relative
            try:
                if path.stat().st_size != size:
                    return False
            except OSError:
                return False
        return bool(self.files)


def read_record(work: Workdir, stage: str) -> StageRecord | None:
    """The stage's record, or None when absent or unreadable (a damaged record only costs a re-run)."""
    try:
        doc = json.loads(work.record_file(stage).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.pop("format", None) != RECORD_FORMAT:
        return None
    try:
        return StageRecord(**doc)
    except TypeError:
        return None


def write_record(work: Workdir, stage: str, key: str, seconds: float, summary: dict[str, Any]) -> StageRecord:
    """Record a stage whose output (WORKDIR/<stage>) is complete."""
    output = work.output(stage)
    record = StageRecord(
        stage=stage, key=key,
        finished_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        seconds=round(seconds, 3), output=output.relative_to(work.root).as_posix(),
        files=files_with_sizes(work.root, output), summary=summary)
    write_text_atomic(work.record_file(stage),
                      dumps({"format": RECORD_FORMAT, **asdict(record)}) + "\n")
    return record
