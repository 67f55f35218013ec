"""The int4 decode paths in whole engines. The MLP's fused path (decoder.MLP with kernels/w4a16_gemv_gated.py):
silu(gate) * up in the int4 gate_up GEMV, which also applies down_proj's AWQ input scale so that the down GEMV
skips it; and on Hopper the tensor-core decode kernel (kernels/w4a16_mma_decode.py) for 2..64 rows.

On CPU: which Linears offer the pieces, and (test_interpreted_*, in a child process under Triton's interpreter)
that an int4_awq engine's MLP gives the same output fused and unfused. On a GPU (skipped elsewhere): whole
engines through CUDA graphs with the fused MLP on and off, in float32 (same tokens) and, at SmolLM2's shapes,
in bf16 (rounding-level differences); on Hopper, a bf16 engine decoding 4 sequences with the tensor-core decode
kernel on and off.
"""

from __future__ import annotations

import pytest
import torch

from helpers.corpus import CORPUS
from helpers.tiny_models import make_tiny_hf_model
from helpers.triton_interpreter import interpreted, run_interpreted_tests, runs_children
from llmx.kernels import ops

FAMILIES = ["llama", "qwen2", "qwen3"]
GREEDY = dict(max_new_tokens=12, ignore_eos=True)


@runs_children
def test_runtime_in_triton_interpreter():
    """Runs this file's test_interpreted_* tests in a fresh process with TRITON_INTERPRET=1."""
    run_interpreted_tests(__file__)


def int4_engine(family: str, tmp, device: str, dtype: str = "float32", group_size: int = 32, **hf_overrides):
    """A tiny `family` model quantized with int4_awq (group 32: AWQ leaves pre_quant_scale on o/down), built
    without tuning: tuning compiles every tile candidate, which took the SmolLM2-shaped bf16 test past its time
    limit on a GPU (tests use the default tiles)."""
    from llmx.ingest.convert import convert
    from llmx.build.engine import build_engine
    from llmx.quant.api import quantize
    from llmx.formats.config import BuildConfig

    hf_dir = make_tiny_hf_model(family, tmp / "hf", dtype=getattr(torch, dtype), **hf_overrides)
    calib = tmp / "calib.txt"
    calib.write_text((CORPUS / "austen_emma.txt").read_text()[:20_000])
    quantize(convert(hf_dir, tmp / "ckpt", dtype=dtype), tmp / "q", algo="int4_awq", calib_data=str(calib),
             calib_size=8, calib_seq_len=64, group_size=group_size, device=device)
    build = BuildConfig(max_batch_size=8, max_seq_len=256, max_num_tokens=256, kv_block_size=16, device=device)
    return build_engine(tmp / "q", tmp / f"engine-{device}", build, tune=False).path


@pytest.fixture(scope="module")
def cpu_int4_mlp(tmp_path_factory):
    from llmx.runtime.engine import LLM

    llm = LLM(int4_engine("llama", tmp_path_factory.mktemp("fused-mlp"), "cpu"))
    return next(iter(llm.runner.model.layers.values())).mlp


def test_int4_awq_mlp_offers_the_gated_kernel_and_down_scale(cpu_int4_mlp):
    mlp = cpu_int4_mlp
    tensors, scale = mlp.down_proj.method.split_input_scale(mlp.down_proj.tensors)
    assert "pre_quant_scale" not in tensors and tensors["weight"] is mlp.down_proj.tensors["weight"]
    assert scale is mlp.down_proj.tensors["pre_quant_scale"]
    assert mlp.gate_up_proj.method.split_input_scale(mlp.gate_up_proj.tensors) is None  # AWQ folded it into the norm
    # CPU tensors: no kernel, so the MLP takes the unfused path and equals it exactly.
    x = torch.randn(2, mlp.gate_up_proj.in_features)
    assert mlp.gate_up_proj.gated(x) is None
    expected = mlp.down_proj(ops.silu_and_mul(mlp.gate_up_proj(x)))
    assert torch.equal(mlp(x), expected)


def test_unquantized_linears_have_no_gated_kernel():
    from llmx.formats.weights import UnquantizedMethod

    method = UnquantizedMethod()
    tensors = {"weight": torch.randn(8, 4)}
    assert method.apply_gated(tensors, torch.randn(1, 4), None) is None
    assert method.split_input_scale(tensors) is None


@interpreted
def test_interpreted_fused_mlp_equals_unfused(cpu_int4_mlp, monkeypatch):
    """The GEMVs run in the interpreter on CPU tensors: the fused MLP (gated GEMV with down's scale, then the
    down GEMV without it) against the unfused one (GEMV, silu_and_mul, down GEMV with its scale)."""
    mlp = cpu_int4_mlp
    monkeypatch.setattr(ops, "use_kernels", lambda t: True)
    gated = []
    apply_gated = mlp.gate_up_proj.method.apply_gated
    monkeypatch.setattr(mlp.gate_up_proj.method, "apply_gated", lambda *a: gated.append(1) or apply_gated(*a))
    for rows in (1, 3):
        x = torch.randn(rows, mlp.gate_up_proj.in_features, generator=torch.Generator().manual_seed(rows))
        fused = mlp(x)
        ops.set_fused_mlp(False)
        try:
            unfused = mlp(x)
        finally:
            ops.set_fused_mlp(True)
        assert (fused - unfused).abs().max().item() <= 1e-5 * unfused.abs().max().item()
    assert len(gated) == 2


# ---------------------------------------------------------------------------------------------------
# on the GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")


def _generate_both_ways(engine, prompts, monkeypatch):
    """[(greedy tokens, one-token-step logits)] with the fused MLP off, then on, through CUDA graphs; checks
    that the gated kernel was launched (at graph capture and in eager steps) only when on."""
    from llmx.kernels import w4a16_gemv_gated
    from llmx.runtime.engine import LLM
    from llmx.runtime.sequence import SamplingParams

    launches = []
    kernel = w4a16_gemv_gated.w4a16_gemv_gated
    monkeypatch.setattr(w4a16_gemv_gated, "w4a16_gemv_gated", lambda *a, **k: launches.append(1) or kernel(*a, **k))
    results = []
    for enabled in (False, True):
        ops.set_fused_mlp(enabled)
        launches.clear()
        try:
            llm = LLM(engine, kv_cache_fraction=0.2)
            assert llm.runner.graphs is not None
            tokens = [o.output_token_ids for o in llm.generate(prompts, SamplingParams(**GREEDY))]
            logits = torch.stack([llm.runner.prompt_logits(p[:1])[0] for p in prompts])
            results.append((tokens, logits))
        finally:
            ops.set_fused_mlp(True)
        assert bool(launches) == enabled
    return results


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_fused_mlp_equals_unfused_fp32(family, tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 256, (n,), generator=gen).tolist() for n in (1, 3, 18, 40)]
    (off_tokens, off_logits), (on_tokens, on_logits) = _generate_both_ways(int4_engine(family, tmp_path, "cuda"),
                                                                           prompts, monkeypatch)
    assert on_tokens == off_tokens
    assert (on_logits - off_logits).abs().max().item() <= 1e-4 * off_logits.abs().max().item()


@gpu
@pytest.mark.gpu
def test_gpu_fused_mlp_bf16_smollm2_shapes(tmp_path, monkeypatch):
    """SmolLM2-135M's layer shapes (12 of its 30 layers, a smaller vocabulary) in bf16: down's scale is applied
    before a rounding instead of after, so logits agree to bf16 noise and greedy decoding picks the same tokens
    almost everywhere."""
    engine = int4_engine("llama", tmp_path, "cuda", "bfloat16", tie=True, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=12, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         vocab_size=8192, initializer_range=0.02)
    prompts = [[5 + i] * (3 + 11 * i) for i in range(4)]
    (off_tokens, off_logits), (on_tokens, on_logits) = _generate_both_ways(engine, prompts, monkeypatch)
    relative = ((on_logits - off_logits).norm() / off_logits.norm()).item()
    assert relative <= 0.05, relative
    agree = sum(a == b for on, off in zip(on_tokens, off_tokens) for a, b in zip(on, off))
    assert agree >= 0.9 * sum(len(t) for t in off_tokens)


@gpu
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="needs a Hopper GPU (the tensor-core decode kernel)")
def test_gpu_tensor_core_decode_matches_the_gemv_path_bf16(tmp_path, monkeypatch):
    """An int4_awq engine with groups of 128 in bf16, 4 sequences at once: with the tensor-core decode kernel on,
    every decode step's Linears and fused MLP run it (M = 4, through CUDA graphs); off, the GEMV does. Greedy
    tokens agree almost everywhere and 4-token prefill logits (M = 4 as well) agree to bf16 noise."""
    from llmx.kernels import w4a16_gemv_gated, w4a16_mma_decode
    from llmx.runtime.engine import LLM
    from llmx.runtime.sequence import SamplingParams

    engine = int4_engine("llama", tmp_path, "cuda", "bfloat16", group_size=128, tie=True, hidden_size=256,
                         intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, vocab_size=4096, initializer_range=0.02)
    prompts = [[5 + i] * (3 + 7 * i) for i in range(4)]
    launches = []
    launch = w4a16_mma_decode.launch_w4a16_mma_decode

    def counted(*args, **kwargs):
        launches.append(kwargs.get("gated", False))
        return launch(*args, **kwargs)

    monkeypatch.setattr(w4a16_mma_decode, "launch_w4a16_mma_decode", counted)
    monkeypatch.setattr(w4a16_gemv_gated, "launch_w4a16_mma_decode", counted)
    hopper = w4a16_mma_decode._hopper
    results = []
    for enabled in (False, True):  # off: the dispatch chooses as on a GPU without wgmma
        monkeypatch.setattr(w4a16_mma_decode, "_hopper", hopper if enabled else (lambda index: False))
        launches.clear()
        llm = LLM(engine, kv_cache_fraction=0.2)
        assert llm.runner.graphs is not None
        tokens = [o.output_token_ids for o in llm.generate(prompts, SamplingParams(**GREEDY))]
        logits = torch.stack([llm.runner.prompt_logits(p[:4])[-1] for p in prompts])
        results.append((tokens, logits))
        assert (set(launches) == {False, True}) if enabled else not launches
    (off_tokens, off_logits), (on_tokens, on_logits) = results
    relative = ((on_logits - off_logits).norm() / off_logits.norm()).item()
    assert relative <= 0.03, relative
    agree = sum(a == b for on, off in zip(on_tokens, off_tokens) for a, b in zip(on, off))
    assert agree >= 0.9 * sum(len(t) for t in off_tokens)
