"""Resolve a command's settings: command default < recipe section < flag given on the command line.

Every recipe-settable option is declared with default None in the typer signature, so "the user typed
this flag" is simply "the value is not None"; the real defaults live in each command's DEFAULTS dict
(shown in --help) and apply only when neither the flag nor the recipe sets the value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmx.common.errors import LlmxError

# Library modules that `llmx --help` does not need are imported inside the commands that use them: --help
# imports every command module and must stay under 0.6 s (torch, transformers and pydantic alone take more).


@dataclass(frozen=True)
class Settings:
    command: str
    values: dict[str, Any]
    sources: dict[str, str]  # key -> "flag" | "recipe" | "default"
    recipe: str | None  # the recipe's display name (e.g. recipes/llama/h100.yaml), None without --recipe

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def to_dict(self) -> dict[str, Any]:
        return {"command": self.command, "recipe": self.recipe, "settings": self.values, "sources": self.sources}


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def resolve_settings(command: str, *, recipe: str | None, flags: dict[str, Any], defaults: dict[str, Any]) -> Settings:
    """Merge defaults, the recipe's `command` section and the flags (non-None values) into Settings.

    A flag that contradicts the recipe's target hardware (e.g. `--algo fp8` with an A100 recipe) is refused,
    as the same value written in the recipe would be.
    """
    unknown = set(flags) - set(defaults)
    if unknown:
        raise AssertionError(f"flags without a default in {command}: {sorted(unknown)}")
    from_recipe: dict[str, Any] = {}
    recipe_name = target = None
    if recipe is not None:
        from llmx.recipes import load_recipe

        loaded, recipe_name = load_recipe(recipe)
        from_recipe, target = loaded.section(command), loaded.target
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, default in defaults.items():
        if flags.get(key) is not None:
            values[key], sources[key] = flags[key], "flag"
        elif key in from_recipe:
            values[key], sources[key] = from_recipe[key], "recipe"
        else:
            values[key], sources[key] = default, "default"
    _check_ranges(command, recipe_name, values, sources)
    if target is not None:
        _check_flags_against_target(command, target, recipe_name, values, sources)
    return Settings(command, values, sources, recipe_name)


def _check_ranges(command: str, recipe_name: str | None, values: dict[str, Any], sources: dict[str, str]) -> None:
    """Every number from a flag or the recipe within its range (common.limits): NaN, a seed beyond 64 bits or
    a size with an extra digit is refused here, naming where it came from."""
    from llmx.common.limits import SETTING_LIMITS, out_of_range

    given = {key: value for key, value in values.items() if sources[key] != "default"}
    problem = out_of_range(given, SETTING_LIMITS)
    if problem is not None:
        key, text = problem
        where = flag_name(key) if sources[key] == "flag" else f"{recipe_name}: `{command}.{key}`"
        raise LlmxError(f"{where} {text}.")


def _check_flags_against_target(command: str, target: str, recipe_name: str, values: dict[str, Any],
                                sources: dict[str, str]) -> None:
    from llmx.recipes.loader import canonical_algo
    from llmx.recipes.schema import target_conflict

    for key, value in values.items():
        if sources[key] != "flag":
            continue
        checked = canonical_algo(value) if (command, key) == ("quantize", "algo") else value
        problem = target_conflict(target, command, key, checked)
        if problem:
            raise LlmxError(f"{flag_name(key)} {value} does not fit recipe {recipe_name}: {problem}.")


def require(settings: Settings, key: str) -> Any:
    """The value of a setting that has no default: it must come from a flag or the recipe."""
    value = settings.values[key]
    if value is None:
        raise LlmxError(f"{flag_name(key)} is required: pass it, or use a --recipe whose "
                        f"`{settings.command}` section sets `{key}`.")
    return value
