"""Hub model IDs: `convert ORG/NAME[@REVISION]` through huggingface_hub's cache (offline) and downloads (a local
stand-in hub), revision pinning, provenance, local paths winning, and one sentence for every refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers.fake_hub import FakeHub
from helpers.hub_cache import add_to_hub_cache
from llmx.formats.checkpoint import read_checkpoint
from llmx.ingest.convert import convert
from llmx.ingest.hub import parse_hub_id, resolve_model_source
from llmx.common.errors import LlmxError


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local stand-in for the hub, with an empty cache and HF_HUB_OFFLINE off."""
    from huggingface_hub import constants

    with FakeHub() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield server


def _tensors(ckpt):
    return load_file(str(ckpt / "rank0.safetensors"))


def _message(call) -> str:
    with pytest.raises(LlmxError) as info:
        call()
    return info.value.message


@pytest.mark.parametrize("spec,expected", [
    ("meta-llama/Llama-3.1-8B-Instruct", ("meta-llama/Llama-3.1-8B-Instruct", None)),
    ("Qwen/Qwen3-8B@v1.0", ("Qwen/Qwen3-8B", "v1.0")),
    ("org/name@refs/pr/3", ("org/name", "refs/pr/3")),
    ("./org/name", None), ("/abs/model", None), ("model", None), ("a/b/c", None), ("~/x/y", None),
])
def test_hub_id_spelling(spec, expected):
    assert parse_hub_id(spec) == expected


def test_offline_hub_id_converts_like_the_local_folder(tiny_model_dir, offline_cache, tmp_path):
    local = tiny_model_dir("qwen2", seed=4)
    snapshot = add_to_hub_cache(offline_cache, "tiny-org/tiny-qwen2", local)
    from_hub = convert("tiny-org/tiny-qwen2", tmp_path / "from-hub")
    from_local = convert(local, tmp_path / "from-local")

    got, want = _tensors(from_hub), _tensors(from_local)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    prov, local_prov = read_checkpoint(from_hub).provenance, read_checkpoint(from_local).provenance
    assert prov["hub"] == {"repo_id": "tiny-org/tiny-qwen2", "revision": None, "commit": snapshot.name}
    assert prov["source"] == str(snapshot) and prov["source_hash"] == local_prov["source_hash"]
    assert "hub" not in local_prov
    assert sorted(p.name for p in from_hub.iterdir()) == sorted(p.name for p in from_local.iterdir())


def test_revision_pins_a_branch_tag_or_commit(tiny_model_dir, offline_cache, tmp_path):
    old = add_to_hub_cache(offline_cache, "org/tiny", tiny_model_dir("llama", seed=1), revisions=("v1",))
    new = add_to_hub_cache(offline_cache, "org/tiny", tiny_model_dir("llama", seed=2), revisions=("main",))
    assert old.name != new.name
    for spec, snapshot, revision in (("org/tiny", new, None), ("org/tiny@v1", old, "v1"),
                                     (f"org/tiny@{old.name}", old, old.name)):
        out = convert(spec, tmp_path / spec.replace("/", "_").replace("@", "_"))
        assert read_checkpoint(out).provenance["hub"] == {"repo_id": "org/tiny", "revision": revision,
                                                          "commit": snapshot.name}
        embed = load_file(str(snapshot / "model.safetensors"))["model.embed_tokens.weight"]
        assert torch.equal(_tensors(out)["embed.weight"], embed.to(torch.bfloat16)), spec


def test_an_existing_local_path_wins_over_the_hub_id(tiny_model_dir, offline_cache, tmp_path, monkeypatch):
    add_to_hub_cache(offline_cache, "org/tiny", tiny_model_dir("llama"))
    local = tiny_model_dir("qwen3")
    (tmp_path / "org").mkdir()
    local.rename(tmp_path / "org" / "tiny")
    monkeypatch.chdir(tmp_path)
    out = convert("org/tiny", tmp_path / "ckpt")
    ckpt = read_checkpoint(out)
    assert ckpt.model.architecture == "Qwen3ForCausalLM" and "hub" not in ckpt.provenance


def test_a_snapshot_folder_given_as_a_path_keeps_its_hub_identity(tiny_model_dir, offline_cache):
    snapshot = add_to_hub_cache(offline_cache, "org/tiny", tiny_model_dir("llama"))
    path, hub = resolve_model_source(str(snapshot))
    assert path == snapshot and (hub.repo_id, hub.commit) == ("org/tiny", snapshot.name)


def test_offline_and_not_cached_names_hf_hub_offline(offline_cache, tmp_path):
    message = _message(lambda: convert("org/absent", tmp_path / "ckpt"))
    assert "org/absent" in message and "HF_HUB_OFFLINE" in message and "\n" not in message
    assert not (tmp_path / "ckpt").exists()


def test_a_cached_repository_without_safetensors_is_refused(tiny_model_dir, offline_cache, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny_model_dir("llama") / "config.json").read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    add_to_hub_cache(offline_cache, "org/pickled", folder)
    message = _message(lambda: convert("org/pickled", tmp_path / "ckpt"))
    assert "org/pickled" in message and "safetensors" in message and "pickled" in message


def test_download_fetches_only_what_convert_reads_then_works_offline(tiny_model_dir, hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    src = tiny_model_dir("llama3", multi_shard=True)
    for extra in ("pytorch_model.bin", "training_args.pt", "README.md", "original/consolidated.safetensors"):
        (src / extra).parent.mkdir(exist_ok=True)
        (src / extra).write_bytes(b"not for convert")
    commit = hub.add("org/tiny", src)
    reports = []
    out = convert("org/tiny", tmp_path / "ckpt", progress=lambda *r: reports.append(r))

    shards = sorted(p.name for p in src.glob("model-*.safetensors"))
    assert sorted(hub.downloaded) == sorted(["config.json", "generation_config.json", "model.safetensors.index.json",
                                             "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                                             *shards])
    assert read_checkpoint(out).provenance["hub"]["commit"] == commit
    total = sum((src / name).stat().st_size for name in hub.downloaded)
    downloads = [r for r in reports if r[0] == "download org/tiny"]
    assert downloads[-1] == ("download org/tiny", total, total)
    assert [r[1:] for r in reports if r[0] == "download org/tiny files"][-1] == (len(hub.downloaded),) * 2

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the cache now serves it without the hub
    hub.downloaded.clear()
    again = convert("org/tiny", tmp_path / "again")
    assert hub.downloaded == [] and torch.equal(_tensors(again)["embed.weight"], _tensors(out)["embed.weight"])


def test_a_hub_repository_of_pickled_weights_is_refused_without_fetching_them(tiny_model_dir, hub, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny_model_dir("llama") / "config.json").read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    hub.add("org/pickled", folder)
    message = _message(lambda: convert("org/pickled", tmp_path / "ckpt"))
    assert "publishes no safetensors" in message and hub.downloaded == ["config.json"]


def test_gated_and_missing_repositories_are_one_sentence_and_hf_token_opens_the_gate(tiny_model_dir, hub, tmp_path,
                                                                                     monkeypatch):
    hub.add("org/gated", tiny_model_dir("llama"), token="hf_secret")
    gated = _message(lambda: convert("org/gated", tmp_path / "a"))
    assert "gated" in gated and "HF_TOKEN" in gated and "https://huggingface.co/org/gated" in gated
    missing = _message(lambda: convert("org/nothing-here", tmp_path / "b"))
    assert "org/nothing-here is neither a local path nor a model on the Hugging Face hub" in missing
    for message in (gated, missing):
        assert "\n" not in message and "Traceback" not in message
    assert hub.downloaded == []

    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    out = convert("org/gated", tmp_path / "c")
    assert read_checkpoint(out).provenance["hub"]["repo_id"] == "org/gated"


def test_cli_honours_hf_home_and_hf_hub_offline(tiny_model_dir, tmp_path):
    """The real command in a fresh process: HF_HOME places the cache, HF_HUB_OFFLINE keeps it off the network."""
    snapshot = add_to_hub_cache(tmp_path / "home" / "hub", "org/tiny", tiny_model_dir("mistral"))
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    run = subprocess.run([sys.executable, "-m", "llmx", "convert", "org/tiny", "-o", str(tmp_path / "ckpt"), "--json"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["model"]["architecture"] == "MistralForCausalLM"
    assert read_checkpoint(tmp_path / "ckpt").provenance["hub"]["commit"] == snapshot.name

    refused = subprocess.run([sys.executable, "-m", "llmx", "convert", "org/other", "-o", str(tmp_path / "x")],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "HF_HUB_OFFLINE" in refused.stderr and str(tmp_path / "home" / "hub") in refused.stderr


def test_an_unreachable_hub_is_one_sentence_naming_both_readings(tmp_path, monkeypatch):
    """A mistyped local path spelled like a hub ID reaches the hub: the message says it is neither."""
    import socket

    from huggingface_hub import constants

    with socket.socket() as sock:  # a port nothing listens on: the connection is refused at once
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", closed + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    message = _message(lambda: convert("ckpt/llama8b", tmp_path / "out"))
    assert message.startswith("ckpt/llama8b is not a local path, and as a hub model it is not in the hub cache")
    assert "could not be reached" in message and message.endswith("check the network, or pass a local folder.")


def test_smollm2_from_the_hub_cache_equals_the_local_folder(offline_cache, tmp_path):
    from helpers.smollm2 import smollm2_dir

    local = smollm2_dir()
    snapshot = add_to_hub_cache(offline_cache, "HuggingFaceTB/SmolLM2-135M-Instruct", local)
    from_hub = convert("HuggingFaceTB/SmolLM2-135M-Instruct@main", tmp_path / "from-hub")
    from_local = convert(local, tmp_path / "from-local")
    hub_prov, local_prov = read_checkpoint(from_hub).provenance, read_checkpoint(from_local).provenance
    assert hub_prov["hub"] == {"repo_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "main",
                               "commit": snapshot.name}
    assert hub_prov["source_hash"] == local_prov["source_hash"]
    for name in ("rank0.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (from_hub / name).read_bytes() == (from_local / name).read_bytes(), name


def test_dummy_weights_fetch_no_weights(tiny_model_dir, hub, tmp_path):
    src = tiny_model_dir("llama")
    hub.add("org/tiny", src)
    out = convert("org/tiny", tmp_path / "ckpt", dummy_weights=True)
    assert not any(name.endswith(".safetensors") for name in hub.downloaded) and "config.json" in hub.downloaded
    prov = read_checkpoint(out).provenance
    assert prov["dummy_weights"] is True and prov["hub"]["repo_id"] == "org/tiny"
