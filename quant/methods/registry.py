"""Registers every quantized weight format in METHODS under each algorithm name that writes it.

int4_wo (round to nearest), int4_awq and int4_gptq differ in how the weights were chosen, not in how they
are stored, so they share the int4 format. Imported lazily by llmx.quant.methods.method_for.
"""

from __future__ import annotations

from llmx.quant.methods import METHODS
from llmx.quant.methods.fp8 import Fp8Method, Fp8PerChannelMethod
from llmx.quant.methods.int4 import Int4Method
from llmx.quant.methods.int8 import Int8SmoothQuantMethod, Int8WeightOnlyMethod
from llmx.quant.methods.nvfp4 import Nvfp4Method
from llmx.quant.methods.w4a8 import W4A8Method

_INT4 = Int4Method()

METHODS.update({
    "fp8": Fp8Method(),
    "fp8_pc_pt": Fp8PerChannelMethod(),
    "int8_sq": Int8SmoothQuantMethod(),
    "int8_wo": Int8WeightOnlyMethod(),
    "int4_wo": _INT4,
    "int4_awq": _INT4,
    "int4_gptq": _INT4,
    "w4a8_awq": W4A8Method(),
    "nvfp4": Nvfp4Method(),
})
