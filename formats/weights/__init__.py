"""Weight formats. `method_for(quant_config, module_name)` picks the QuantMethod a Linear uses.

METHODS holds one QuantMethod per algorithm name, the class its row of llmx.formats.presets.PRESETS names
(llmx.formats.weights.registry); a module listed in the checkpoint's excluded modules, or any module of an
unquantized checkpoint, uses the unquantized method. A format whose stored tensors
depend on the checkpoint (the int4 group size, a module's pre_quant_scale) has a `configure(quant,
module_name)` that returns the instance for that module.
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING

from llmx.common.errors import LlmxError
from llmx.formats.weights.base import QuantMethod, TensorSpec
from llmx.formats.weights.unquantized import UnquantizedMethod

if TYPE_CHECKING:
    from llmx.formats.config import QuantConfig

UNQUANTIZED = UnquantizedMethod()

# algo name -> QuantMethod instance. Quantized formats are added by llmx.formats.weights.registry.
METHODS: dict[str, QuantMethod] = {"none": UNQUANTIZED}


def is_excluded(module_name: str, exclude: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(module_name, pat) for pat in exclude)


def method_for(quant: "QuantConfig | None", module_name: str) -> QuantMethod:
    if quant is None or quant.algo == "none" or is_excluded(module_name, quant.exclude):
        return UNQUANTIZED
    _load_registry()
    method = METHODS.get(quant.algo)
    if method is None:
        raise LlmxError(f"quantization.algo {quant.algo!r} is not a weight format this llmx knows "
                        f"({', '.join(sorted(METHODS))}); re-create the checkpoint with this llmx version.")
    return method.configure(quant, module_name)


def _load_registry() -> None:
    # Imported lazily: the quantized formats pull in kernels and are not needed for bf16 engines.
    from llmx.formats.weights.registry import register_all

    register_all()


__all__ = ["QuantMethod", "TensorSpec", "METHODS", "UNQUANTIZED", "method_for", "is_excluded"]
