"""Find, read and validate recipe files, turning every problem into one sentence that names file and key.

A recipe is named either by a path to a YAML file or as `<family>/<target>` for the recipes shipped inside
the package (`llama/h100` is `llmx/recipes/llama/h100.yaml`).
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

from llmx.common.errors import LlmxError
from llmx.formats.presets import KV_ONLY, PRESETS, resolve_algo
from llmx.recipes.schema import SECTIONS, Recipe, target_conflict

# The llmx modules that import torch are imported inside the functions that use them, so importing this
# module does not load torch.

_SHIPPED_NAME = re.compile(r"^[a-z0-9_]+/[a-z0-9_]+$")


def shipped_recipes() -> list[str]:
    """Names (`family/target`) of the recipes that ship with llmx, sorted."""
    root = resources.files("llmx.recipes")
    return sorted(f"{d.name}/{f.name.removesuffix('.yaml')}"
                  for d in root.iterdir() if d.is_dir() and not d.name.startswith(("_", "."))
                  for f in d.iterdir() if f.name.endswith(".yaml"))


def find_recipe(spec: str | Path) -> tuple[Path, str]:
    """(file, display name) of a recipe given as a path or as a shipped `family/target` name."""
    path = Path(spec)
    if path.is_file():
        return path, str(spec)
    if _SHIPPED_NAME.match(str(spec)):
        family, target = str(spec).split("/")
        shipped = resources.files("llmx.recipes") / family / f"{target}.yaml"
        if shipped.is_file():
            return Path(str(shipped)), f"recipes/{family}/{target}.yaml"
    raise LlmxError(f"recipe {spec} not found: pass a YAML file path or a shipped recipe "
                    f"({', '.join(shipped_recipes())}).")


def load_recipe(spec: str | Path) -> tuple[Recipe, str]:
    """Read and validate a recipe; returns it with the name to show in messages and provenance."""
    import yaml
    from pydantic import ValidationError

    path, name = find_recipe(spec)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise LlmxError(f"{name}: not valid YAML{where} ({getattr(exc, 'problem', None) or exc}); fix the file.") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise LlmxError(f"{name}: cannot be read ({exc}).") from exc
    if not isinstance(data, dict):
        raise LlmxError(f"{name}: a recipe must be a YAML mapping with `family`, `target` and stage sections.")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise LlmxError(describe_validation_error(exc, name)) from exc
    recipe = _check_algo_names(recipe, name)
    _check_lm_head(recipe, name)
    for section in SECTIONS:
        for key, value in recipe.section(section).items():
            problem = target_conflict(recipe.target, section, key, value)
            if problem:
                raise LlmxError(f"{name}: `{section}.{key}` {value}: {problem}.")
    _check_pipeline_lists(recipe, name)
    return recipe, name


def describe_validation_error(exc: Any, name: str) -> str:
    """One sentence for the first problem pydantic found (unknown keys first: they are the likeliest typo)."""
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    loc = ".".join(str(part) for part in first["loc"])
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(_fields_at(first["loc"][:-1]))
        return f"{name}: unknown key `{loc}`; allowed: {allowed}{more}."
    if first["type"] == "missing":
        return f"{name}: `{loc}` is required{more}."
    return f"{name}: `{loc}`: {first['msg']} (got {first['input']!r}){more}."


def _fields_at(loc: tuple) -> list[str]:
    """The keys allowed at `loc` (a pydantic location such as ("bench", "scenarios", 0)), walking the schema."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):  # a list index: the list's item model is already `model`
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            break
        nested = _model_in(field.annotation)
        if nested is None:
            break
        model = nested
    return list(model.model_fields)


def _model_in(annotation: Any) -> Any:
    """The pydantic model inside an annotation such as `X`, `X | None` or `list[X] | None`, else None."""
    from typing import get_args

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _check_pipeline_lists(recipe: Recipe, name: str) -> None:
    """Checks across the entries of `eval.datasets` and `bench.scenarios` that pydantic cannot express alone."""
    for section, entries in (("eval.datasets", recipe.eval.datasets), ("bench.scenarios", recipe.bench.scenarios)):
        seen: set[str] = set()
        for i, entry in enumerate(entries or ()):
            if entry.name in seen:
                raise LlmxError(f"{name}: `{section}.{i}.name` {entry.name!r} is used twice; give every entry its "
                                "own name (it names the output file and the gates).")
            seen.add(entry.name)
    for i, scenario in enumerate(recipe.bench.scenarios or ()):
        if scenario.concurrency is not None and scenario.request_rate is not None:
            raise LlmxError(f"{name}: `bench.scenarios.{i}` sets both concurrency and request_rate, two ways to "
                            "offer load; keep one.")


def _check_lm_head(recipe: Recipe, name: str) -> None:
    """`quantize.quantize_lm_head: true` with a `quantize.exclude` pattern matching lm_head asks for both."""
    from llmx.quant.api import lm_head_exclusion

    section = recipe.quantize
    if not section.quantize_lm_head:
        return
    clash = lm_head_exclusion(section.exclude)
    if clash is not None:
        raise LlmxError(f"{name}: `quantize.quantize_lm_head` is true but `quantize.exclude` {clash!r} leaves lm_head "
                        "unquantized: the two contradict; drop one of them.")


def canonical_algo(algo: str) -> str:
    """The canonical quantization algorithm name (aliases such as `awq` resolved); unknown names are refused."""
    return resolve_algo(algo)


def _check_algo_names(recipe: Recipe, name: str) -> Recipe:
    """Refuse unknown algorithm names; returns the recipe with `quantize.algo` in canonical form."""
    algo = recipe.quantize.algo
    if algo is None:
        return recipe

    try:
        canonical = canonical_algo(algo)
    except LlmxError:
        raise LlmxError(f"{name}: `quantize.algo` {algo} is not a known algorithm; use one of "
                        f"{', '.join((*PRESETS, KV_ONLY))}.") from None
    quantize = recipe.quantize.model_copy(update={"algo": canonical})
    return recipe.model_copy(update={"quantize": quantize})
