"""The pipeline as a JUnit XML report, the format CI systems (GitHub test reporters, GitLab, Jenkins) display.

One <testsuite name="llmx pipeline">, one <testcase> per stage (classname "stage") and per gate
(classname "gate"). A failed gate is a <failure> (a regression: the assertion failed); a failed stage is
an <error> (the pipeline broke before it could judge), the distinction JUnit readers draw between a
test that failed and one that could not run. Skipped and not-run stages are <skipped>.
"""

from __future__ import annotations

import platform
import xml.etree.ElementTree as ET
from pathlib import Path

import llmx
from llmx.pipeline.gates import Gate
from llmx.pipeline.runner import PipelineResult, StageResult
from llmx.pipeline.workdir import write_text_atomic

SUITE_NAME = "llmx pipeline"


def junit_xml(result: PipelineResult) -> str:
    skipped = sum(s.status in ("skipped", "not run") for s in result.stages)
    suite = ET.Element("testsuite", {
        "name": SUITE_NAME,
        "tests": str(len(result.stages) + len(result.gates)),
        "failures": str(len(result.failed_gates)),
        "errors": str(len(result.failed_stages)),
        "skipped": str(skipped),
        "time": f"{result.seconds:.3f}",
        "timestamp": result.started_at,
        "hostname": platform.node(),
    })
    properties = ET.SubElement(suite, "properties")
    plan = result.plan
    for name, value in (("recipe", plan.recipe), ("model", str(plan.model)), ("workdir", str(plan.workdir)),
                        ("llmx", llmx.__version__)):
        ET.SubElement(properties, "property", {"name": name, "value": value})
    for stage in result.stages:
        suite.append(_stage_case(stage))
    for gate in result.gates:
        suite.append(_gate_case(gate))
    root = ET.Element("testsuites", {"name": SUITE_NAME, "tests": suite.get("tests"),
                                     "failures": suite.get("failures"), "errors": suite.get("errors"),
                                     "skipped": suite.get("skipped"), "time": suite.get("time")})
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(result: PipelineResult, path: Path) -> None:
    write_text_atomic(Path(path), junit_xml(result))


def _stage_case(stage: StageResult) -> ET.Element:
    case = ET.Element("testcase", {"classname": "stage", "name": stage.name, "time": f"{stage.seconds:.3f}"})
    if stage.status == "failed":
        error = ET.SubElement(case, "error", {"message": stage.message or "failed", "type": "StageFailed"})
        error.text = stage.traceback or stage.message
    elif stage.status in ("skipped", "not run"):
        ET.SubElement(case, "skipped", {"message": f"{stage.status}: {stage.message}"})
    out = ET.SubElement(case, "system-out")
    out.text = f"{stage.status} in {stage.seconds:.1f} s" + (f" (key {stage.key})" if stage.key else "")
    return case


def _gate_case(gate: Gate) -> ET.Element:
    case = ET.Element("testcase", {"classname": "gate", "name": gate.name, "time": "0"})
    verdict = gate.verdict()
    if not gate.passed:
        failure = ET.SubElement(case, "failure", {"message": verdict, "type": "GateFailed"})
        failure.text = verdict
    out = ET.SubElement(case, "system-out")
    out.text = verdict
    return case
