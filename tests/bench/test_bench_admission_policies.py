"""measurements/admission_policies.py: the scheduler's admission policies on one workload, without a model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


SCRIPTS = Path(__file__).resolve().parents[2] / "measurements"


def test_reserve_never_recomputes_where_watermark_admission_thrashes(tmp_path):
    # Sequences that each end with 127 tokens of KV (8 blocks) in a 64-block cache: about 8 fit at once.
    out = tmp_path / "policies.json"
    done = subprocess.run([sys.executable, str(SCRIPTS / "admission_policies.py"), "--isl", "64", "--osl", "64",
                           "--num-requests", "40", "--max-batch", "16", "--kv-cache-tokens", "1024",
                           "--max-num-tokens", "256", "--policies", "reserve,watermark=0", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    reserve, greedy = json.loads(out.read_text())["results"]
    assert reserve["preemptions"] == reserve["tokens_recomputed"] == 0
    assert greedy["preemptions"] > 0 and greedy["tokens_recomputed"] > 0
    assert reserve["peak_running"] < greedy["peak_running"]
    for r in (reserve, greedy):
        assert r["tokens_computed"] == 40 * 127 + r["tokens_recomputed"]
        assert sum(r["steps_by_type"].values()) == r["steps"]


def test_the_script_prints_and_writes_each_policy(tmp_path):
    out = tmp_path / "policies.json"
    done = subprocess.run([sys.executable, str(SCRIPTS / "admission_policies.py"), "--isl", "32", "--osl", "32",
                           "--num-requests", "12", "--max-batch", "8", "--kv-cache-tokens", "512",
                           "--policies", "reserve,watermark=0.05", "--json", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [r["policy"] for r in json.loads(out.read_text())["results"]] == ["reserve", "watermark=0.05"]
    assert "watermark=0.05" in done.stdout
    bad = subprocess.run([sys.executable, str(SCRIPTS / "admission_policies.py"), "--isl", "32", "--osl", "32",
                          "--num-requests", "1", "--max-batch", "1", "--kv-cache-tokens", "512", "--policies", "lru"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "policy 'lru'" in bad.stderr
