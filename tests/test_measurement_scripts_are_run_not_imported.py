"""Tests exercise the scripts under measurements/ the way users run them (as programs, in a subprocess), never by
putting measurements/ on sys.path or loading a script file as a module: the scripts are not part of the package,
and code that tests need to import belongs in the package."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _script_imports(path: Path) -> list[str]:
    """`sys.path.insert/append(...)` calls and `spec_from_file_location(...)` loads in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name == "spec_from_file_location":
            found.append(f"{path.relative_to(TESTS.parent)}:{node.lineno} loads a file as a module")
        if (name in ("insert", "append") and isinstance(func, ast.Attribute) and isinstance(func.value, ast.Attribute)
                and func.value.attr == "path" and getattr(func.value.value, "id", "") == "sys"):
            found.append(f"{path.relative_to(TESTS.parent)}:{node.lineno} changes sys.path")
    return found


def test_no_test_imports_a_script_through_sys_path():
    # tests/conftest.py puts tests/ itself on sys.path, for the shared helpers/ package.
    files = [p for p in sorted(TESTS.rglob("*.py")) if p != TESTS / "conftest.py"]
    found = [hit for path in files for hit in _script_imports(path)]
    assert not found, f"run the script as a subprocess, or move the code the test needs into the package: {found}"
