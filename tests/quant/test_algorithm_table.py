"""One table of quantization algorithms (llmx.formats.presets.PRESETS): a new algorithm is one row, its QuantMethod
and its kernel, and every consumer sees it with no further edit.

The test adds, for its duration, an algorithm `int8_pt_demo` (alias `demo8`): int8 weights with one float32 scale
per tensor, AWQ-style smoothing vectors, FP8-free, stored by PerTensorInt8 below and run by a kernel `demo_gemm`
registered in the tuning tables; ModelOpt's HF folders would name it DEMO_INT8. Each consumer of the table
(the registry, the algorithm names and group-size rule, recipe and build target checks, build's tile tuning, the
llmx export, the HF import) is one parametrised case: one that kept its own list of algorithms would not see it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmx.build import tune as build_tune
from llmx.formats.checkpoint import checkpoint_tensor_specs, read_checkpoint
from llmx.common.errors import LlmxError
from llmx.kernels import tuning
from llmx.formats import presets
from llmx.formats.weights import METHODS, QuantMethod, TensorSpec, method_for
from llmx.formats.weights.int4 import has_pre_quant_scale
from llmx.formats.config import Mapping, ModelConfig, QuantConfig

ALGO, ALIAS, KERNEL, HF_NAME = "int8_pt_demo", "demo8", "demo_gemm", "DEMO_INT8"
H, I = 64, 128
CONFIG = ModelConfig(architecture="LlamaForCausalLM", family="llama", vocab_size=32, hidden_size=H,
                     intermediate_size=I, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                     max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0)


class PerTensorInt8(QuantMethod):
    """int8 weights [N, K] times one float32 scale; 16-bit activations, times pre_quant_scale [K] where kept."""

    name = "int8_per_tensor"

    def __init__(self, pre_quant_scale: bool = False):
        self.pre_quant_scale = pre_quant_scale

    def configure(self, quant, module_name):
        return type(self)(has_pre_quant_scale(quant, module_name))

    def weight_specs(self, out_features, in_features, act_dtype):
        specs = {"weight": TensorSpec((out_features, in_features), "int8", out_dim=(0, 1), in_dim=(1, 1)),
                 "weight_scale": TensorSpec((), "float32")}
        if self.pre_quant_scale:
            specs["pre_quant_scale"] = TensorSpec((in_features,), act_dtype, in_dim=(0, 1))
        return specs

    def quantize_weight(self, weight, act_dtype, *, weight_amax=None, input_amax=None, pre_quant_scale=None):
        amax = weight.float().abs().amax() if weight_amax is None else weight_amax.float().reshape(())
        scale = (amax / 127).clamp_min(1e-12)
        out = {"weight": torch.round(weight.float() / scale).clamp(-127, 127).to(torch.int8), "weight_scale": scale}
        if pre_quant_scale is not None:
            out["pre_quant_scale"] = pre_quant_scale.to(getattr(torch, act_dtype))
        return out

    def dequantize_weight(self, tensors):
        return tensors["weight"].float() * tensors["weight_scale"]

    def fuse_outputs(self, parts):
        scales = torch.stack([p["weight_scale"] for p in parts])
        assert torch.equal(scales, scales[:1].expand_as(scales)), "export shares one scale per fused group"
        return {"weight": torch.cat([p["weight"] for p in parts]), "weight_scale": parts[0]["weight_scale"]}

    def apply(self, tensors, x, bias):
        if "pre_quant_scale" in tensors:
            x = x * tensors["pre_quant_scale"].to(x.dtype)
        return torch.nn.functional.linear(x, self.dequantize_weight(tensors).to(x.dtype), bias)


ROW = presets.Preset(ALGO, "int8 weights with one scale per tensor (a test format)",
                     method=f"{__name__}:PerTensorInt8", weight={"num_bits": 8, "axis": None}, input=None,
                     algorithm={"method": "awq_lite", "alpha_step": 0.1}, needs_calibration=True, kernel=KERNEL,
                     needs_fp8=True, smoothing=True, per_tensor_weight_scale=True, hf_quant_algo=HF_NAME,
                     aliases=(ALIAS,))


@pytest.fixture
def demo_row(monkeypatch):
    """The row, and the kernel's entries in the tuning tables (what a new kernel file registers there)."""
    monkeypatch.setitem(presets.PRESETS, ALGO, ROW)
    monkeypatch.setitem(tuning.TUNING_CASES, KERNEL, (__name__, "demo_tuning_case"))
    monkeypatch.setitem(tuning._WEIGHT_BITS, KERNEL, 8)
    yield ROW
    METHODS.pop(ALGO, None)  # the registry instantiated the row's method at its first use


def demo_tuning_case(m, n, k, device="cuda", dtype=torch.bfloat16):
    """What `tuning.autotune` times for the demo kernel (the fake timer below never launches it)."""
    return (lambda cfg: cfg), (lambda out: True)


def _quant() -> QuantConfig:
    """A checkpoint's quantization as `llmx quantize` records it for the algorithm."""
    from llmx.quant.export_llmx import pre_quant_scale_patterns

    patterns = pre_quant_scale_patterns(ALGO)
    return QuantConfig(algo=ALGO, exclude=("lm_head",), extra={"pre_quant_scale_modules": patterns})


# ---- the consumers -----------------------------------------------------------------------------------

def registry(tmp_path):
    """method_for finds the row's QuantMethod; excluded modules stay unquantized."""
    method = method_for(_quant(), "layers.0.mlp.down_proj")
    assert isinstance(method, PerTensorInt8) and method.pre_quant_scale
    assert not method_for(_quant(), "layers.0.mlp.gate_proj").pre_quant_scale
    assert method_for(_quant(), "lm_head").name == "unquantized"


def names_and_modelopt_config(tmp_path):
    """--algo spellings, calibration, group size and the ModelOpt config come from the row."""
    assert presets.resolve_algo(ALIAS.upper()) == ALGO
    with pytest.raises(LlmxError, match=f"{ALGO}.*{ALIAS} = {ALGO}"):
        presets.resolve_algo("int3")
    assert presets.needs_calibration(ALGO, None) and presets.effective_group_size(ALGO, 64) is None
    config = presets.modelopt_config(ALGO, group_size=None, kv_cache_dtype=None, disabled_modules=[])
    assert config["algorithm"] == ROW.algorithm
    assert {"quantizer_name": f"{presets.LAYER_LINEARS}.weight_quantizer", "cfg": ROW.weight} in config["quant_cfg"]


def recipe_validation(tmp_path):
    """A recipe naming the alias loads as the algorithm; its FP8 need is refused on an A100, as at build."""
    from llmx.build.engine import check_target_supports
    from llmx.recipes import load_recipe
    from llmx.recipes.schema import target_conflict

    recipe = tmp_path / "demo.yaml"
    recipe.write_text(f"family: llama\ntarget: h100\nquantize:\n  algo: {ALIAS}\n")
    assert load_recipe(str(recipe))[0].quantize.algo == ALGO
    assert ALGO in target_conflict("a100", "quantize", "algo", ALGO)
    assert target_conflict("h100", "quantize", "algo", ALGO) is None
    assert ALGO not in target_conflict("a100", "quantize", "algo", "fp8")  # it is not offered instead of fp8

    class Ckpt:
        path, quant = tmp_path, _quant()

    with pytest.raises(LlmxError, match=f"--algo {ALGO}, which needs FP8 support"):
        check_target_supports(Ckpt(), {"compute_capability": "8.0", "device_name": "NVIDIA A100-SXM4-80GB"})


def tile_tuning(tmp_path):
    """`llmx build` tunes the row's kernel for every GEMM shape of the model."""
    shapes = build_tune.gemm_shapes(CONFIG, _quant(), Mapping())
    assert shapes == {KERNEL: [(64, 64), (64, I), (128, H), (2 * I, H)]}  # o, down, q|k|v, gate|up
    info = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "triton": "x"}
    report = build_tune.tune_engine_kernels(shapes, 16, act_dtype="bfloat16", device_info=info,
                                            cache=build_tune.TileCache(tmp_path / "tiles.json", info),
                                            make_case=demo_tuning_case, timer=lambda fn: 1.0)
    assert set(report.table["kernels"]) == {KERNEL} and report.timed == 4 * 2  # 4 shapes x buckets 1, 16


def llmx_export(tmp_path):
    """The export keeps the row's smoothing vectors on o_proj/down_proj and shares its per-tensor scale."""
    from llmx.quant.export_llmx import LinearState, export_tensors

    g = torch.Generator().manual_seed(0)
    shapes = {"attn.q_proj": (64, H), "attn.k_proj": (32, H), "attn.v_proj": (32, H), "attn.o_proj": (H, 64),
              "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I)}
    source = {f"layers.0.{m}.weight": torch.randn(*s, generator=g) * 0.05 for m, s in shapes.items()}
    source.update({"embed.weight": torch.randn(32, H, generator=g), "lm_head.weight": torch.randn(32, H, generator=g),
                   "final_norm.weight": torch.rand(H, generator=g) + 0.5,
                   "layers.0.attn_norm.weight": torch.rand(H, generator=g) + 0.5,
                   "layers.0.mlp_norm.weight": torch.rand(H, generator=g) + 0.5})
    source = {k: v.to(torch.bfloat16) for k, v in source.items()}
    states = {}
    for m, (n, k) in shapes.items():
        s = torch.rand(k, generator=g) + 0.5
        states[f"layers.0.{m}"] = LinearState(weight=source[f"layers.0.{m}.weight"].float() / s, pre_quant_scale=s)
    quant = _quant()
    out = dict(export_tensors(CONFIG, "bfloat16", quant, source=lambda n: source[n], states=states, kv_amax={}))
    assert list(out) == list(checkpoint_tensor_specs(CONFIG, "bfloat16", quant))
    assert "layers.0.attn.o_proj.pre_quant_scale" in out and "layers.0.attn.q_proj.pre_quant_scale" not in out
    scales = [out[f"layers.0.attn.{p}_proj.weight_scale"] for p in "qkv"]
    assert scales[0] == scales[1] == scales[2]


def hf_import(tmp_path):
    """A ModelOpt-style HF folder naming the row's quant_algo imports as the algorithm, scales as it stores them."""
    from helpers.tiny_models import make_tiny_hf_model
    from llmx.ingest.hf_import import import_checkpoint, imported_format

    hf = make_tiny_hf_model("llama", tmp_path / "hf", dtype=torch.bfloat16)
    (weights,) = hf.glob("*.safetensors")
    tensors = load_file(weights)
    for name in [n for n in tensors if ".layers." in n and n.endswith("_proj.weight")]:
        w = tensors.pop(name).float()
        scale = w.abs().amax() / 127
        module = name.removesuffix(".weight")
        tensors[name] = torch.round(w / scale).to(torch.int8)
        tensors[f"{module}.weight_scale"] = scale.reshape(1)  # [1]: stored as a scalar
        tensors[f"{module}.input_scale"] = torch.tensor(0.5)  # not part of the format: dropped
    save_file(tensors, weights)
    (hf / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt", "version": "0"},
         "quantization": {"quant_algo": HF_NAME, "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}}))
    assert imported_format(hf) == "modelopt"
    ckpt = read_checkpoint(import_checkpoint(hf, tmp_path / "ckpt"))
    assert ckpt.quant.algo == ALGO
    stored = load_file(next(Path(ckpt.path).glob("rank0.safetensors")))
    scale = stored["layers.0.attn.q_proj.weight_scale"]
    assert scale.shape == () and scale.dtype == torch.float32
    assert "layers.0.attn.q_proj.input_scale" not in stored
    assert torch.equal(stored["layers.0.attn.q_proj.weight"], tensors["model.layers.0.self_attn.q_proj.weight"])


CONSUMERS = [registry, names_and_modelopt_config, recipe_validation, tile_tuning, llmx_export, hf_import]


@pytest.mark.parametrize("consumer", CONSUMERS, ids=lambda c: c.__name__)
def test_a_new_algorithm_row_reaches(consumer, demo_row, tmp_path):
    consumer(tmp_path)


@pytest.mark.parametrize("consumer", CONSUMERS, ids=lambda c: c.__name__)
def test_without_the_row_the_consumer_does_not_know_the_algorithm(consumer, tmp_path):
    """The same checks fail without the row: each consumer refuses the name, in one sentence, from the table alone."""
    with pytest.raises(LlmxError, match=f"(?i){ALGO}|{ALIAS}|{HF_NAME}"):
        consumer(tmp_path)
