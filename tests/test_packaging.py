"""Packaging: every package folder ships in the wheel, and so do the recipes; run from the checkout, llmx's
folders do not shadow installed top-level packages."""

from __future__ import annotations

import fnmatch
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Folders under the repository root that are not part of the installed package.
NOT_PACKAGED = {"tests", "measurements", "docs", ".ci", ".git", ".venv", ".setuptools-build", "dist"}


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def package_folders() -> dict[str, Path]:
    """Dotted llmx name -> folder, for every folder holding an __init__.py (the root is `llmx`)."""
    found = {"llmx": REPO}
    for init in REPO.rglob("__init__.py"):
        folder = init.parent
        relative = folder.relative_to(REPO)
        if folder == REPO or relative.parts[0] in NOT_PACKAGED or relative.parts[0].startswith("."):
            continue
        found[".".join(("llmx", *relative.parts))] = folder
    return found


def test_every_package_folder_is_listed():
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    missing = sorted(set(package_folders()) - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml"


def test_every_listed_package_exists():
    listed = pyproject()["tool"]["setuptools"]["packages"]
    stale = [name for name in listed if name not in package_folders()]
    assert not stale, f"pyproject.toml lists packages with no __init__.py folder: {stale}"


def test_the_root_is_mapped_into_the_llmx_namespace():
    assert pyproject()["tool"]["setuptools"]["package-dir"] == {"llmx": "."}


def test_recipes_are_package_data():
    patterns = pyproject()["tool"]["setuptools"]["package-data"]["llmx.recipes"]
    recipes = sorted(p.relative_to(REPO / "recipes").as_posix() for p in (REPO / "recipes").rglob("*.yaml"))
    assert len(recipes) >= 16
    unshipped = [r for r in recipes if not any(fnmatch.fnmatch(r, pattern) for pattern in patterns)]
    assert not unshipped, f"recipes not covered by package-data {patterns}: {unshipped}"


def test_console_script_points_at_main():
    assert pyproject()["project"]["scripts"]["llmx"] == "llmx.cli.main:main"
    from llmx.cli.main import main

    assert callable(main)


def test_importing_llmx_from_the_checkout_unshadows_its_subfolders():
    """`python -c` / `python -m` from the repository root put it on sys.path, where kernels/ and build/ would
    stand in for Hugging Face's `kernels` (which transformers imports) and PyPA's `build`."""
    code = ("import importlib.util, os, sys; before = importlib.util.find_spec('kernels'); import llmx; "
            "after = importlib.util.find_spec('kernels'); "
            "print(before is not None and os.path.dirname(before.origin)); print(after and after.origin)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    before, after = out.stdout.splitlines()
    assert Path(before) == REPO / "kernels"  # the shadowing is real before llmx is imported
    assert after == "None" or Path(after).parent != REPO / "kernels", after  # absent, or the installed one
