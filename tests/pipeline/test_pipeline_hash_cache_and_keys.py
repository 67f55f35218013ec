"""Content hashes remembered by file stat, and which inputs each stage's key covers."""

from __future__ import annotations

import os
import time

import pytest

import llmx.pipeline.hash_cache as hash_cache_module
from llmx.cli.pipeline import stage_defaults
from llmx.pipeline.hash_cache import HashCache
from llmx.pipeline.keys import compute_keys
from llmx.pipeline.plan import make_plan


@pytest.fixture
def reads(monkeypatch):
    """Counts the files HashCache actually reads."""
    seen = []
    real = hash_cache_module.hash_file

    def counting(path, *args):
        seen.append(path.name)
        return real(path, *args)

    monkeypatch.setattr(hash_cache_module, "hash_file", counting)
    return seen


def aged(path, seconds: float = 3600):
    """Give a file an old timestamp, as a model downloaded long ago has."""
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def test_an_unchanged_file_is_read_once_across_runs(tmp_path, reads):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"w" * 1000)
    aged(weights)
    cache_file = tmp_path / "cache.json"
    first = HashCache(cache_file)
    digest = first.file_hash(weights)
    first.save()
    assert HashCache(cache_file).file_hash(weights) == digest
    assert HashCache(cache_file).file_hash(weights) == digest
    assert reads == ["model.safetensors"]


def test_touch_rereads_but_hashes_the_same_and_new_content_hashes_differently(tmp_path, reads):
    text = tmp_path / "calib.txt"
    text.write_text("first text")
    aged(text)
    cache = HashCache(tmp_path / "cache.json")
    digest = cache.file_hash(text)
    aged(text, seconds=60)  # touched: another timestamp, same content
    assert cache.file_hash(text) == digest
    text.write_text("other text")  # same size, other content
    aged(text, seconds=30)
    assert cache.file_hash(text) != digest
    assert reads == ["calib.txt"] * 3


def test_a_file_written_just_before_hashing_is_not_trusted_to_its_stamp(tmp_path, reads):
    text = tmp_path / "fresh.txt"
    text.write_text("abc")
    cache = HashCache(tmp_path / "cache.json")
    cache.file_hash(text)
    cache.file_hash(text)  # within the racy window: read again
    assert reads == ["fresh.txt", "fresh.txt"]
    aged(text)
    cache.file_hash(text)
    cache.file_hash(text)  # old now, and hashed after its last change: trusted
    assert reads == ["fresh.txt"] * 3


def test_tree_hash_covers_names_and_contents_but_not_hidden_files(tmp_path):
    model = tmp_path / "hf"
    (model / ".cache").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"123")
    cache = HashCache(tmp_path / "cache.json")
    digest = cache.tree_hash(model)
    (model / ".cache" / "download.metadata").write_text("rewritten by a download tool")
    (model / ".gitattributes").write_text("*")
    assert cache.tree_hash(model) == digest
    (model / "model.safetensors").rename(model / "renamed.safetensors")
    assert cache.tree_hash(model) != digest


def test_a_damaged_cache_file_is_ignored(tmp_path):
    (tmp_path / "cache.json").write_text("{not json")
    text = tmp_path / "a.txt"
    text.write_text("a")
    assert HashCache(tmp_path / "cache.json").file_hash(text).startswith("sha256:")


def keys_for(project, **sections):
    plan = make_plan(str(project.recipe(**sections)), defaults=stage_defaults(), model=project.model,
                     workdir=project.workdir)
    return compute_keys(plan, HashCache(project.root / "cache.json"))


def changed(before, after) -> set[str]:
    names = ("convert", "quantize", "build", "eval", "bench")
    return {n for n in names if before.of(n) != after.of(n)}


def test_each_change_invalidates_its_stage_and_those_after_it(project):
    base = keys_for(project)
    sections = project.base()
    assert changed(base, keys_for(project)) == set()
    build = {**sections["build"], "max_batch_size": 2}
    assert changed(base, keys_for(project, build=build)) == {"build", "eval", "bench"}
    quantize = {**sections["quantize"], "calib_size": 8}
    assert changed(base, keys_for(project, quantize=quantize)) == {"quantize", "build", "eval", "bench"}
    bench = {"warmup": 1, "scenarios": [{**sections["bench"]["scenarios"][0], "osl": 5}]}
    assert changed(base, keys_for(project, bench=bench)) == {"bench"}
    dataset = sections["eval"]["datasets"][0]
    assert changed(base, keys_for(project, eval={"datasets": [{**dataset, "windows": 1}]})) == {"eval"}
    assert keys_for(project, eval={"datasets": [{**dataset, "windows": 1}]}).references != base.references
    everything = {"convert", "quantize", "build", "eval", "bench"}
    assert changed(base, keys_for(project, convert={"dtype": "float32"})) == everything


def test_gate_thresholds_are_in_no_key(project):
    base = keys_for(project)
    sections = project.base()
    dataset = {**sections["eval"]["datasets"][0], "max_increase": 99.0, "max_perplexity": 5.0}
    scenario = {**sections["bench"]["scenarios"][0], "min_output_tok_s": 1e6, "max_ttft_ms": 1.0, "tolerance": 1.0}
    other = keys_for(project, eval={"datasets": [dataset]}, bench={"warmup": 1, "scenarios": [scenario]})
    assert changed(base, other) == set() and other.references == base.references


def test_the_llmx_version_is_in_every_key(project, monkeypatch):
    import llmx

    base = keys_for(project)
    monkeypatch.setattr(llmx, "__version__", "99.0.0")
    assert changed(base, keys_for(project)) == {"convert", "quantize", "build", "eval", "bench"}
