"""llmx's formats against ModelOpt itself: the weights llmx stores dequantize to exactly what ModelOpt's
quantizers compute, NVFP4 packing is bit-identical to NVFP4QTensor, and ModelOpt's HF int4 packing
converts to llmx's."""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch

from llmx.formats import presets
from llmx.formats.weights.fp8 import Fp8Method, Fp8PerChannelMethod
from llmx.formats.weights.int4 import Int4Method
from llmx.formats.weights.int8 import Int8WeightOnlyMethod
from llmx.formats.weights.nvfp4 import Nvfp4Method

N, K = 64, 128


@pytest.fixture(scope="module")
def mtq():
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as mtq
    return mtq


def _fake_quantized_weight(mtq, algo, weight, group_size=32):
    """ModelOpt's fake-quantized weight for one Linear, through llmx's own preset config."""

    class Decoder(torch.nn.Module):  # named like transformers: the presets target `*.layers.*_proj`
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList([torch.nn.Module()])
            self.model.layers[0].up_proj = torch.nn.Linear(K, N, bias=False)

        def forward(self, x):
            return self.model.layers[0].up_proj(x)

    model = Decoder()
    linear = model.model.layers[0].up_proj
    with torch.no_grad():
        linear.weight.copy_(weight)
    cfg = presets.modelopt_config(algo, group_size=presets.effective_group_size(algo, group_size),
                                  kv_cache_dtype=None, disabled_modules=[])
    with contextlib.redirect_stdout(io.StringIO()):
        mtq.quantize(model, cfg, lambda m: m(torch.randn(4, K)))
    linear = model.model.layers[0].up_proj
    with torch.no_grad():
        return linear.weight_quantizer(linear.weight).float(), linear.weight_quantizer.amax


@pytest.mark.parametrize("algo, method", [
    ("int4_wo", Int4Method(group_size=32)),
    ("int8_wo", Int8WeightOnlyMethod()),
    ("fp8_pc_pt", Fp8PerChannelMethod()),
    ("fp8", Fp8Method()),
])
def test_dequantized_weights_equal_modelopt_fake_quant(mtq, algo, method):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * 0.05
    expected, amax = _fake_quantized_weight(mtq, algo, w)
    tensors = method.quantize_weight(w, "float32", weight_amax=amax, input_amax=torch.tensor(1.0))
    assert torch.allclose(method.dequantize_weight(tensors), expected, rtol=1e-6, atol=1e-7)


def test_nvfp4_packing_is_bit_identical_to_modelopt(mtq):
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    w = torch.randn(N, K, generator=torch.Generator().manual_seed(1)) * 0.05
    w[3, :16] = 0.0  # an all-zero block
    ours = Nvfp4Method().quantize_weight(w, "bfloat16", input_amax=torch.tensor(2.0))
    packed, block_scales, global_scale = NVFP4QTensor.quantize(w.clone(), 16)
    assert torch.equal(ours["weight"], packed._quantized_data)
    assert torch.equal(ours["weight_scale"].view(torch.uint8), block_scales.view(torch.uint8))
    assert torch.equal(ours["weight_scale_2"], global_scale.float().reshape(()))
    assert ours["input_scale"].item() == pytest.approx(2.0 / (6 * 448))


def test_modelopt_hf_int4_packing_converts_to_llmx(mtq):
    from modelopt.torch.export.quant_utils import pack_int4_in_uint8

    from llmx.ingest.hf_import import _repack_int4

    w = torch.randn(N, K, generator=torch.Generator().manual_seed(2)) * 0.05
    method = Int4Method(group_size=32)
    ours = method.quantize_weight(w, "float32")
    scale = ours["weight_scale"]
    hf_packed = pack_int4_in_uint8(w, scale, 32)
    assert tuple(hf_packed.shape) == (N // 2, K)
    assert torch.equal(_repack_int4(hf_packed), ours["weight"])
