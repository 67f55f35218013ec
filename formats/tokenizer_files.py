"""Which tokenizer files travel with a model: HF folder -> checkpoint -> engine.

The runtime loads the tokenizer with `transformers.AutoTokenizer.from_pretrained(engine_dir)`, so every
file that call may read is copied. A tokenizer that needs custom Python code (`auto_map` in
tokenizer_config.json) is copied only when the user trusts remote code, with the modules its `auto_map` names
and the folder's modules they import: never the model's own code (modeling_*.py, configuration_*.py), which llmx
does not run.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from llmx.common.errors import LlmxError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
)


def find_tokenizer_files(src_dir: Path, *, trust_remote_code: bool) -> list[Path]:
    """The tokenizer files present in `src_dir`, plus its .py files when the tokenizer needs custom code."""
    src_dir = Path(src_dir)
    files = [src_dir / name for name in TOKENIZER_FILES if (src_dir / name).is_file()]
    if _needs_custom_code(src_dir / "tokenizer_config.json"):
        if not trust_remote_code:
            raise LlmxError(f"{src_dir / 'tokenizer_config.json'} declares a custom tokenizer class (`auto_map`), "
                            "which runs Python code from the model folder; pass --trust-remote-code if you trust "
                            "its source.")
        files += tokenizer_code_files(src_dir)
    return files


# `from .tokenization_base import X` / `from . import helpers` / `import tokenization_base` in a tokenizer module
_LOCAL_IMPORT = re.compile(r"^\s*(?:from\s+\.(\w*)\s+import\s+([\w, ]+)|import\s+(\w+))", re.MULTILINE)


def tokenizer_code_files(src_dir: Path) -> list[Path]:
    """The .py files the tokenizer's `auto_map` names, plus the folder's modules they import (transitively)."""
    config_path = src_dir / "tokenizer_config.json"
    entries = json.loads(config_path.read_text())["auto_map"]
    refs = entries.get("AutoTokenizer", []) if isinstance(entries, dict) else []
    refs = refs if isinstance(refs, list) else [refs]
    pending = []
    for ref in refs:
        if ref is None:
            continue
        if not isinstance(ref, str) or "." not in ref:
            raise LlmxError(f"{config_path}: `auto_map.AutoTokenizer` entry {ref!r} is not 'module.ClassName'; fix "
                            "the tokenizer config.")
        if "--" in ref:
            raise LlmxError(f"{config_path}: `auto_map.AutoTokenizer` entry {ref!r} loads code from another "
                            "repository; llmx carries only code from the model folder: copy that module into it.")
        pending.append(ref.rsplit(".", 1)[0])
    for module in pending:
        if not (src_dir / f"{module}.py").is_file():
            raise LlmxError(f"{config_path} names the tokenizer module {module!r} but {src_dir / module}.py is "
                            "missing; re-download the model folder.")
    found: dict[str, Path] = {}
    while pending:
        module = pending.pop()
        path = src_dir / f"{module}.py"
        if module in found or not path.is_file():  # a module outside the folder (json, transformers, ...)
            continue
        found[module] = path
        for relative, names, plain in _LOCAL_IMPORT.findall(path.read_text(encoding="utf-8", errors="replace")):
            if relative:
                pending.append(relative)
            elif names:  # `from . import a, b`: each name may be a sibling module
                pending.extend(n.strip() for n in names.split(",") if n.strip())
            else:
                pending.append(plain)
    return sorted(found.values())


def _needs_custom_code(tokenizer_config: Path) -> bool:
    if not tokenizer_config.is_file():
        return False
    try:
        data = json.loads(tokenizer_config.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LlmxError(f"{tokenizer_config} is not valid JSON ({exc}); re-download the tokenizer files.") from None
    return isinstance(data, dict) and bool(data.get("auto_map"))


def copy_files(files: list[Path], dst_dir: Path) -> None:
    for f in files:
        shutil.copy2(f, Path(dst_dir) / f.name)


def pin_tokenizer_class(src_dir: Path, dst_dir: Path) -> None:
    """Record in the copied tokenizer_config.json the tokenizer class transformers picks for the source.

    Without the source's config.json, which llmx outputs do not carry, transformers may load the same
    tokenizer files as a generic class that splits text differently from the model's own (seen with
    Qwen2), so the class resolved from the complete source folder is written down.
    """
    config_path = Path(dst_dir) / "tokenizer_config.json"
    if not config_path.is_file() or _needs_custom_code(config_path):
        return  # no config to pin, or a custom class (auto_map) that already names itself: never run its code
    from transformers import AutoTokenizer

    try:
        cls = type(AutoTokenizer.from_pretrained(str(src_dir))).__name__
    except (OSError, ValueError) as exc:
        raise LlmxError(f"{src_dir}: its tokenizer files could not be loaded ({exc}); fix or remove them.") from None
    data = json.loads(config_path.read_text())
    if data.get("tokenizer_class") != cls:
        data["tokenizer_class"] = cls
        config_path.write_text(json.dumps(data, indent=2, ensure_ascii=False))
