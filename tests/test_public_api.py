"""`from llmx import LLM, SamplingParams` (what users of vLLM and TensorRT-LLM type) works, lazily: importing llmx
loads no torch, and each public name is the object the library defines."""

from __future__ import annotations

import subprocess
import sys


def test_public_names_are_the_library_objects():
    import llmx
    from llmx.bench.runner import run_benchmark
    from llmx.ingest.convert import convert
    from llmx.build.engine import build_engine
    from llmx.quant.api import quantize
    from llmx.runtime.engine import LLM
    from llmx.eval.perplexity import evaluate_perplexity
    from llmx.runtime.sequence import SamplingParams

    from llmx import LLM as top_llm, SamplingParams as top_params  # noqa: I001

    assert (top_llm, top_params) == (LLM, SamplingParams)
    expected = {"LLM": LLM, "SamplingParams": SamplingParams, "convert": convert, "quantize": quantize,
                "build_engine": build_engine, "evaluate_perplexity": evaluate_perplexity,
                "run_benchmark": run_benchmark}
    assert {name: getattr(llmx, name) for name in expected} == expected
    assert set(expected) <= set(llmx.__all__) and set(expected) <= set(dir(llmx))


def test_an_unknown_name_is_an_attribute_error():
    import llmx

    try:
        llmx.no_such_thing  # noqa: B018
    except AttributeError as err:
        assert "no_such_thing" in str(err)
    else:
        raise AssertionError("llmx.no_such_thing did not raise")


def test_importing_llmx_loads_no_torch():
    code = "import sys, llmx; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
