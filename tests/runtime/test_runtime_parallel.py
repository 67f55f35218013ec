"""Tensor and pipeline parallelism on CPU: llmx starts the ranks itself (gloo) and they must compute
what one rank computes."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from helpers.tiny_models import make_tiny_hf_model
from llmx.ingest.convert import convert
from llmx.build.engine import build_engine
from llmx.common.errors import LlmxError
from llmx.formats.config import BuildConfig, Mapping
from llmx.runtime.engine import LLM
from llmx.runtime.sequence import SamplingParams

BUILD = BuildConfig(max_batch_size=8, max_seq_len=128, max_num_tokens=128, kv_block_size=16, device="cpu")
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)
PROMPTS = [[5, 9, 33, 2, 71], list(range(10, 47)), [101] * 3]
LAYOUTS = {  # family -> layouts beyond tp=1 (tiny models: 4 query heads, 2 KV heads, 2 layers)
    "llama": [Mapping(tp=2), Mapping(tp=4), Mapping(tp=2, pp=2)],
    "llama3": [Mapping(tp=2)],
    "mistral": [Mapping(tp=2)],
    "qwen2": [Mapping(tp=2), Mapping(pp=2)],
    "qwen3": [Mapping(tp=2), Mapping(tp=2, pp=2)],
}


def run_engine(engine_dir, ids):
    with LLM(engine_dir, kv_cache_tokens=512) as llm:
        logits = llm.runner.prompt_logits(ids)
        tokens = [o.output_token_ids for o in llm.generate(PROMPTS, GREEDY)]
    return logits, tokens


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """family -> (checkpoint, tp=1 logits, tp=1 greedy tokens)."""
    out = {}
    ids = list(range(3, 60))
    for family in LAYOUTS:
        tmp = tmp_path_factory.mktemp(family)
        ckpt = convert(make_tiny_hf_model(family, tmp / "hf"), tmp / "ckpt", dtype="float32")
        out[family] = (ckpt, *run_engine(build_engine(ckpt, tmp / "tp1", BUILD).path, ids))
    return out, ids


@pytest.mark.parametrize("family,mapping", [(f, m) for f, ms in LAYOUTS.items() for m in ms],
                         ids=lambda v: v if isinstance(v, str) else f"tp{v.tp}pp{v.pp}")
def test_parallel_layout_equals_one_rank(reference, family, mapping, tmp_path):
    refs, ids = reference
    ckpt, logits1, tokens1 = refs[family]
    engine = build_engine(ckpt, tmp_path / "engine", BUILD, mapping).path
    logits, tokens = run_engine(engine, ids)
    assert (logits - logits1).abs().max().item() <= 1e-4
    assert tokens == tokens1


@pytest.mark.slow
def test_smollm2_tp3_equals_tp1(tmp_path):
    from helpers.smollm2 import smollm2_dir

    ckpt = convert(smollm2_dir(), tmp_path / "ckpt", dtype="float32")
    ids = list(range(1000, 1040))
    logits1, tokens1 = run_engine(build_engine(ckpt, tmp_path / "tp1", BUILD).path, ids)
    logits3, tokens3 = run_engine(build_engine(ckpt, tmp_path / "tp3", BUILD, Mapping(tp=3)).path, ids)
    assert (logits3 - logits1).abs().max().item() <= 1e-3
    assert tokens3 == tokens1


def test_quantized_int8_wo_tp2_equals_tp1(tmp_path):
    from llmx.quant.api import quantize

    fp32 = convert(make_tiny_hf_model("llama", tmp_path / "hf"), tmp_path / "ckpt", dtype="float32")
    ckpt = quantize(fp32, tmp_path / "q", algo="int8_wo").path
    ids = list(range(3, 40))
    logits1, tokens1 = run_engine(build_engine(ckpt, tmp_path / "tp1", BUILD).path, ids)
    logits2, tokens2 = run_engine(build_engine(ckpt, tmp_path / "tp2", BUILD, Mapping(tp=2)).path, ids)
    assert (logits2 - logits1).abs().max().item() <= 1e-4
    assert tokens2 == tokens1


def test_a_killed_rank_ends_the_job_with_an_error_not_a_hang(tmp_path):
    ckpt = convert(make_tiny_hf_model("llama", tmp_path / "hf"), tmp_path / "ckpt", dtype="float32")
    engine = build_engine(ckpt, tmp_path / "tp2", BUILD, Mapping(tp=2)).path
    llm = LLM(engine, kv_cache_tokens=512)
    worker = llm.runner.procs[0]
    llm.generate([[1, 2, 3]], GREEDY)
    os.kill(worker.pid, 9)
    worker.join(timeout=10)
    started = time.monotonic()
    with pytest.raises(LlmxError, match="rank 1 of 2 exited"):
        llm.generate([[1, 2, 3]], GREEDY)
    assert time.monotonic() - started < 30
    llm.close()
    assert not any(p.is_alive() for p in llm.runner.procs)
    assert not torch.distributed.is_initialized()


def _tp2_engine(tmp_path):
    ckpt = convert(make_tiny_hf_model("llama", tmp_path / "hf"), tmp_path / "ckpt", dtype="float32")
    return build_engine(ckpt, tmp_path / "tp2", BUILD, Mapping(tp=2)).path


def test_a_rank_that_stops_responding_ends_the_job_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMX_RANK_STALL_TIMEOUT", "2")
    llm = LLM(_tp2_engine(tmp_path), kv_cache_tokens=512)
    worker = llm.runner.procs[0]
    llm.generate([[1, 2, 3]], GREEDY)
    os.kill(worker.pid, signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(LlmxError, match=r"rank 1 of 2 stopped responding for \d+ s"):
        llm.generate([[1, 2, 3]], GREEDY)
    assert time.monotonic() - started < 2 + 10
    llm.close()
    assert not any(p.is_alive() for p in llm.runner.procs)


def test_a_rank_that_dies_while_starting_is_named_at_once(tmp_path):
    import multiprocessing
    import threading

    engine = _tp2_engine(tmp_path)
    killed = []

    def kill_the_rank_as_it_starts():  # the started rank imports torch for seconds before it joins
        deadline = time.monotonic() + 60
        while not killed and time.monotonic() < deadline:
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGKILL)
                killed.append(child.pid)
            time.sleep(0.01)

    threading.Thread(target=kill_the_rank_as_it_starts, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(LlmxError, match="rank 1 of 2 exited with code -9 while starting"):
        LLM(engine, kv_cache_tokens=512)
    assert killed and time.monotonic() - started < 30
    assert not torch.distributed.is_initialized()


def test_ctrl_c_during_a_multi_rank_run_exits_130_and_stops_every_rank(tmp_path):
    import subprocess
    import sys

    engine = _tp2_engine(tmp_path)
    # Ctrl-C in a terminal signals the whole process group: rank 0 and the ranks it started
    process = subprocess.Popen([sys.executable, "-m", "llmx", "bench", str(engine), "--isl", "8", "--osl", "40",
                                "--num-requests", "100000", "--warmup", "0", "--concurrency", "1",
                                "--kv-cache-tokens", "256"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:  # until the ranks run requests
        time.sleep(0.5)
        children = _children(process.pid)
        if children and all(_cpu_seconds(pid) > 2 for pid in children):
            break
    assert process.poll() is None, process.communicate()[1]
    children = _children(process.pid)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    time.sleep(1)
    assert not [pid for pid in children if os.path.exists(f"/proc/{pid}") and _state(pid) != "Z"]


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(c) for c in f.read().split()]
    # the ranks are spawned through multiprocessing's resource tracker too: keep python processes running llmx
    return [c for c in found if "spawn_main" in open(f"/proc/{c}/cmdline").read()]


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _state(pid: int) -> str:
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
