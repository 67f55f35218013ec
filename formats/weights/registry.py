"""Registers the QuantMethod of every algorithm of llmx.formats.presets.PRESETS in METHODS, under its name.

Each algorithm's row names the QuantMethod class storing its weights ("module:Class"); algorithms that differ in
how the weights were chosen, not in how they are stored (int4_wo, int4_awq and int4_gptq), name the same class.
Imported lazily by llmx.formats.weights.method_for, which asks `register_all` on every lookup: a row added to the
table is registered at its first use.
"""

from __future__ import annotations

import importlib

from llmx.formats.weights import METHODS
from llmx.formats.weights.base import QuantMethod
from llmx.formats.presets import PRESETS


def method_class(path: str) -> type[QuantMethod]:
    """The class a row's `method` names ("llmx.formats.weights.int4:Int4Method")."""
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def register_all() -> None:
    """An instance of its row's QuantMethod for every algorithm of the table not registered yet."""
    for name, preset in PRESETS.items():
        if name not in METHODS:
            METHODS[name] = method_class(preset.method)()
