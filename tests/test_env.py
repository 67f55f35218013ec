"""common/env.py: the one table of environment variables, read when used, and the README's copy of it."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from llmx.common import env
from llmx.common.errors import LlmxError

REPO = Path(__file__).resolve().parents[1]


def _package_files() -> list[Path]:
    """Every module of the packages pyproject.toml lists (llmx.x.y lives in x/y/)."""
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    files = []
    for package in packages:
        folder = REPO.joinpath(*package.split(".")[1:])
        files += sorted(folder.glob("*.py"))
    return files


def _environment_reads(path: Path) -> list[str]:
    """`os.environ` / `os.getenv` uses in `path` other than writes (`os.environ.update(...)`, item assignment)."""
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os"
                and node.attr in ("environ", "getenv")):
            continue
        parent = parents.get(node)
        if isinstance(parent, ast.Attribute) and parent.attr == "update":
            continue
        if isinstance(parent, ast.Subscript) and isinstance(parent.ctx, ast.Store):
            continue
        found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_only_the_env_module_reads_the_environment():
    reads = [hit for path in _package_files() if path != REPO / "common" / "env.py"
             for hit in _environment_reads(path)]
    assert not reads, f"read these through llmx.common.env (declare the variable there): {reads}"


def test_every_llmx_variable_named_in_the_package_is_declared():
    declared = {var.name for var in env.VARIABLES}
    named = set()
    for path in _package_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("LLMX_") \
                    and node.value.replace("_", "").isalnum() and node.value.isupper():
                named.add(node.value)
    assert named <= declared, named - declared


def test_the_readme_lists_every_variable_as_the_module_declares_it():
    readme = (REPO / "README.md").read_text()
    assert "## Environment variables" in readme
    section = readme.split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    assert env.markdown_table() in section, ("README's table differs from llmx.common.env: replace it with the "
                                              "output of `python -m llmx.common.env`")
    for var in env.VARIABLES:
        assert var.name and var.kind in ("bool", "int", "float", "str", "path") and var.meaning
        assert len(f"| `{var.name}` | {var.kind} | `{var.default}` | {var.set_by} | {var.meaning} |") <= 240


def test_values_are_parsed_when_read_and_bad_ones_are_refused_naming_the_variable(monkeypatch):
    monkeypatch.delenv("LLMX_PDL", raising=False)
    assert env.LLMX_PDL.read() is True
    monkeypatch.setenv("LLMX_PDL", "0")
    assert env.LLMX_PDL.read() is False
    monkeypatch.setenv("LLMX_COLLECTIVE_TIMEOUT", "7.5")
    assert env.LLMX_COLLECTIVE_TIMEOUT.read() == 7.5
    monkeypatch.setenv("LLMX_CACHE_DIR", "~/somewhere")
    assert env.LLMX_CACHE_DIR.read() == Path.home() / "somewhere"
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert env.LOCAL_RANK.read() is None
    for var, bad in ((env.LLMX_PDL, "maybe"), (env.LLMX_COLLECTIVE_TIMEOUT, "-1"),
                     (env.LLMX_COLLECTIVE_TIMEOUT, "nan"), (env.MASTER_PORT, "http")):
        monkeypatch.setenv(var.name, bad)
        with pytest.raises(LlmxError, match=f"{var.name}='{bad}' is not valid"):
            var.read()


def test_the_modules_that_use_a_variable_read_it_at_use_not_at_import(monkeypatch, tmp_path):
    from llmx.build import tune
    from llmx.kernels import pdl
    from llmx.runtime import workers
    from llmx.kernels import ops

    monkeypatch.setenv("LLMX_CACHE_DIR", str(tmp_path))
    assert tune.cache_dir() == tmp_path / "gemm-tiles"
    monkeypatch.setenv("LLMX_COLLECTIVE_TIMEOUT", "9")
    assert workers.RankOptions("engine", "cpu", None, 0.5, True, "127.0.0.1", 1).timeout_s == 9.0
    monkeypatch.setattr(ops, "_FUSED_MLP", None)  # as in a fresh process: no choice made yet
    monkeypatch.setenv("LLMX_FUSED_MLP", "0")
    assert ops.fused_mlp_enabled() is False
    monkeypatch.setattr(pdl, "_ENABLED", None)
    monkeypatch.setenv("LLMX_PDL", "0")
    assert pdl._enabled() is False
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    assert not workers.launched_by_torchrun()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert workers.launched_by_torchrun()


def test_importing_llmx_reads_no_variable():
    """Every declared variable set to a value that does not parse: importing the modules that use them (and the
    CLI) must not fail, because nothing reads them before use."""
    bad = {var.name: "not-a-value" for var in env.VARIABLES if var.kind in ("bool", "int", "float")}
    code = ("import llmx.cli.main, llmx.kernels.pdl, llmx.kernels._triton_util, llmx.kernels.ops, "
            "llmx.runtime.workers, llmx.runtime.engine, llmx.build.tune; print('imported')")
    done = subprocess.run([sys.executable, "-c", code], env={**_base_env(), **bad}, capture_output=True, text=True,
                          timeout=300, cwd=REPO.parent)
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr[-3000:]


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in {var.name for var in env.VARIABLES}}


def test_llmx_debug_is_read_when_an_error_is_reported_and_a_bad_value_counts_as_off(monkeypatch):
    from llmx.cli import main

    monkeypatch.setattr(main, "_debug_flag", False)
    monkeypatch.setenv("LLMX_DEBUG", "1")
    assert main.debug_enabled()
    monkeypatch.setenv("LLMX_DEBUG", "sometimes")
    assert not main.debug_enabled()
    monkeypatch.delenv("LLMX_DEBUG")
    assert not main.debug_enabled()
