"""compressed-tensors checkpoints (FP8, FP8_DYNAMIC, W4A16, W8A8), written by compressed-tensors' own compressors on
CPU, imported by `llmx convert`: in float32 the llmx engine's logits equal those of the producer's dequantized model
and greedy tokens match (W8A8: within its activation rounding); schemes llmx does not run are refused in one
sentence."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.ct_producer import produce
from helpers.tiny_models import make_tiny_hf_model
from llmx.formats.checkpoint import read_checkpoint, verify_checkpoint
from llmx.ingest.convert import convert
from llmx.build.engine import build_engine
from llmx.common.errors import LlmxError
from llmx.formats.config import BuildConfig
from llmx.runtime.engine import LLM
from llmx.runtime.sequence import SamplingParams

ALGOS = {"FP8": "fp8", "FP8_DYNAMIC": "fp8_pc_pt", "W4A16": "int4_wo"}
# The tiny model's Linears have 64 or 128 inputs: W4A16's groups of 128 become groups of 32.
OVERRIDES = {"W4A16": {"weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32,
                                   "symmetric": True, "dynamic": False}}}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_hf_model("qwen2", tmp_path_factory.mktemp("ct") / "hf", dtype=torch.bfloat16)


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _engine(ckpt, tmp_path):
    build = BuildConfig(max_batch_size=4, max_seq_len=128, max_num_tokens=128, kv_block_size=16, device="cpu")
    return LLM(build_engine(ckpt, tmp_path / "engine", build).path)


def _share_group_scales(ct_dir) -> None:
    """Give q/k/v and gate/up one weight scale (weights requantized to the largest) and one input scale (the
    largest), as `llmx build` does to fuse each group into one FP8 GEMM."""
    tensors = load_file(ct_dir / "model.safetensors")
    layers = {int(name.split(".")[2]) for name in tensors if name.startswith("model.layers.")}
    for i in layers:
        for block, projs in (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))):
            names = [f"model.layers.{i}.{block}.{p}" for p in projs]
            weight_scale = torch.stack([tensors[f"{n}.weight_scale"].float() for n in names]).max()
            input_scale = torch.stack([tensors[f"{n}.input_scale"].float() for n in names]).max()
            for n in names:
                dequantized = tensors[f"{n}.weight"].float() * tensors[f"{n}.weight_scale"].float()
                tensors[f"{n}.weight"] = (dequantized / weight_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
                tensors[f"{n}.weight_scale"] = torch.full_like(tensors[f"{n}.weight_scale"], weight_scale)
                tensors[f"{n}.input_scale"] = torch.full_like(tensors[f"{n}.input_scale"], input_scale)
    save_file(tensors, ct_dir / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("scheme", list(ALGOS))
def test_imported_engine_matches_the_producers_dequantized_model(hf_dir, tmp_path, scheme):
    """In float32 both sides round only where FP8 does, so the logits agree to float32 accumulation order.

    The reference is transformers loading the producer's checkpoint (compressed-tensors decompresses it and
    quantizes activations as the checkpoint says). Static FP8 keeps one scale per fused GEMM in llmx, so its
    reference first gets the scales llmx's build gives q/k/v and gate/up.
    """
    from transformers import AutoModelForCausalLM

    produce(hf_dir, tmp_path / "ct", scheme, torch.tensor([_ids(48, 0), _ids(48, 1)]),
            scheme_overrides=OVERRIDES.get(scheme))
    ckpt = read_checkpoint(convert(tmp_path / "ct", tmp_path / "ckpt", dtype="float32"))
    verify_checkpoint(ckpt)
    assert ckpt.quant.algo == ALGOS[scheme] and ckpt.quant.exclude == ("lm_head",)
    assert ckpt.quant.group_size == (32 if scheme == "W4A16" else None)
    assert ckpt.provenance["compressed_tensors_version"]
    llm = _engine(tmp_path / "ckpt", tmp_path)

    if scheme == "FP8":
        _share_group_scales(tmp_path / "ct")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    if scheme != "W4A16":
        assert reference.model.layers[0].mlp.up_proj.weight.dtype == torch.float8_e4m3fn  # loaded as FP8
    ids = _ids(40, 2)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    got = llm.runner.prompt_logits(ids)
    assert (got - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()

    reference.generation_config.eos_token_id = None
    prompts = [_ids(12, seed) for seed in (3, 4, 5)]
    outputs = llm.generate(prompts, SamplingParams(max_new_tokens=16, ignore_eos=True))
    for prompt, out in zip(prompts, outputs):
        with torch.no_grad():
            ref = reference.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0)
        assert out.output_token_ids == ref[0, len(prompt):].tolist()


def test_fp8_tensors_are_the_producers(hf_dir, tmp_path):
    produce(hf_dir, tmp_path / "ct", "FP8", torch.tensor([_ids(32, 0)]))
    convert(tmp_path / "ct", tmp_path / "ckpt")
    source, got = load_file(tmp_path / "ct" / "model.safetensors"), load_file(tmp_path / "ckpt" / "rank0.safetensors")
    for hf, llmx in (("model.layers.1.self_attn.k_proj", "layers.1.attn.k_proj"),
                     ("model.layers.0.mlp.down_proj", "layers.0.mlp.down_proj")):
        assert torch.equal(got[f"{llmx}.weight"].view(torch.uint8), source[f"{hf}.weight"].view(torch.uint8))
        for suffix in ("weight_scale", "input_scale"):
            assert got[f"{llmx}.{suffix}"].shape == () and got[f"{llmx}.{suffix}"].dtype == torch.float32
            assert got[f"{llmx}.{suffix}"] == source[f"{hf}.{suffix}"].float().reshape(())
    assert got["lm_head.weight"].dtype == torch.bfloat16  # ignored: left unquantized


def test_ignore_patterns_leave_matching_linears_unquantized(hf_dir, tmp_path):
    produce(hf_dir, tmp_path / "ct", "FP8_DYNAMIC", torch.tensor([_ids(32, 0)]),
            ignore=["lm_head", "re:.*layers\\.1\\.mlp\\.down_proj$"])
    ckpt = read_checkpoint(convert(tmp_path / "ct", tmp_path / "ckpt"))
    assert sorted(ckpt.quant.exclude) == ["layers.1.mlp.down_proj", "lm_head"]
    tensors = load_file(tmp_path / "ckpt" / "rank0.safetensors")
    assert tensors["layers.1.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert tensors["layers.0.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn


def _rewrite_quantization(ct_dir, **changes):
    config = json.loads((ct_dir / "config.json").read_text())
    config["quantization_config"].update(changes)
    (ct_dir / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("change, message", [
    ({"quantization_status": "frozen"}, "quantization_status is 'frozen'; llmx imports saved (compressed)"),
    ({"format": "nvfp4-pack-quantized"}, "format 'nvfp4-pack-quantized' is not imported by llmx"),
    ({"quant_method": "awq"}, "quant_method 'awq' is AutoAWQ int4 with a zero point per group, which llmx's "
                              "symmetric int4 kernels cannot run; convert the unquantized model"),
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes' is not a format llmx imports"),
    ({"kv_cache_scheme": {"type": "int", "num_bits": 8, "strategy": "tensor"}},
     "kv_cache_scheme {type: 'int', num_bits: 8, strategy: 'tensor'} is not a KV-cache format llmx imports"),
])
def test_formats_llmx_does_not_run_are_refused_in_one_sentence(hf_dir, tmp_path, change, message):
    produce(hf_dir, tmp_path / "ct", "FP8_DYNAMIC", torch.tensor([_ids(32, 0)]))
    if "format" in change:  # the group's own format is what compressed-tensors reads first
        config = json.loads((tmp_path / "ct" / "config.json").read_text())
        config["quantization_config"]["config_groups"]["group_0"]["format"] = change["format"]
        (tmp_path / "ct" / "config.json").write_text(json.dumps(config))
    else:
        _rewrite_quantization(tmp_path / "ct", **change)
    with pytest.raises(LlmxError) as info:
        convert(tmp_path / "ct", tmp_path / "ckpt")
    assert message in info.value.message and "\n" not in info.value.message
    assert not (tmp_path / "ckpt").exists()


def test_weight_only_fp8_is_refused(hf_dir, tmp_path):
    """compressed-tensors 0.20 saves weight-only FP8 as naive-quantized; earlier versions wrote float-quantized."""
    produce(hf_dir, tmp_path / "ct", "FP8_DYNAMIC", torch.tensor([_ids(32, 0)]),
            scheme_overrides={"input_activations": None})
    with pytest.raises(LlmxError, match="format 'naive-quantized' is not imported by llmx"):
        convert(tmp_path / "ct", tmp_path / "ckpt")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["format"] = "float-quantized"
    (tmp_path / "ct" / "config.json").write_text(json.dumps(config))
    with pytest.raises(LlmxError, match="weight-only FP8 \\(no input_activations\\) is not a format llmx runs"):
        convert(tmp_path / "ct", tmp_path / "ckpt")


def test_fp8_kv_cache_scales_are_imported(hf_dir, tmp_path):
    """compressed-tensors 0.20 attaches no KV-cache observers to transformers 5's attention modules (their forward
    takes no `past_key_value`), so the scheme and the scales are added as llm-compressor saves them: the
    scheme's own serialization in quantization_config, `self_attn.k_scale` / `v_scale` tensors of shape [1]."""
    from compressed_tensors.quantization import QuantizationArgs

    produce(hf_dir, tmp_path / "ct", "FP8_DYNAMIC", torch.tensor([_ids(32, 0)]))
    scheme = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)
    _rewrite_quantization(tmp_path / "ct", kv_cache_scheme=scheme.model_dump(mode="json"))
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    scales = {f"model.layers.{i}.self_attn.{kv}_scale": torch.tensor([0.01 * (i + 1) + (kv == "v") * 0.002],
                                                                      dtype=torch.bfloat16)
              for i in range(2) for kv in "kv"}
    save_file({**tensors, **scales}, tmp_path / "ct" / "model.safetensors", metadata={"format": "pt"})

    ckpt = read_checkpoint(convert(tmp_path / "ct", tmp_path / "ckpt"))
    verify_checkpoint(ckpt)
    assert ckpt.quant.algo == "fp8_pc_pt" and ckpt.quant.kv_cache_dtype == "fp8"
    got = load_file(tmp_path / "ckpt" / "rank0.safetensors")
    for i in range(2):
        for kv in "kv":
            value = got[f"layers.{i}.attn.{kv}_scale"]
            assert value.dtype == torch.float32 and value == scales[f"model.layers.{i}.self_attn.{kv}_scale"].float()
    engine = _engine(tmp_path / "ckpt", tmp_path)
    assert engine.generate([_ids(8, 1)], SamplingParams(max_new_tokens=4, ignore_eos=True))[0].output_token_ids


def test_int4_weights_are_the_producers_bytes(hf_dir, tmp_path):
    produce(hf_dir, tmp_path / "ct", "W4A16", torch.tensor([_ids(32, 0)]), scheme_overrides=OVERRIDES["W4A16"])
    convert(tmp_path / "ct", tmp_path / "ckpt")  # bfloat16 activations: the scales stay bf16
    source, got = load_file(tmp_path / "ct" / "model.safetensors"), load_file(tmp_path / "ckpt" / "rank0.safetensors")
    packed = source["model.layers.1.mlp.gate_proj.weight_packed"]
    weight = got["layers.1.mlp.gate_proj.weight"]
    assert weight.dtype == torch.uint8 and weight.shape == (128, 32)
    assert weight.reshape(-1).tolist() == list(packed.numpy().astype("<i4").tobytes())
    assert torch.equal(got["layers.1.mlp.gate_proj.weight_scale"], source["model.layers.1.mlp.gate_proj.weight_scale"])


def test_int4_layouts_llmx_cannot_run_are_refused(hf_dir, tmp_path):
    weights = {**OVERRIDES["W4A16"]["weights"], "symmetric": False}
    produce(hf_dir, tmp_path / "ct", "W4A16", torch.tensor([_ids(32, 0)]), scheme_overrides={"weights": weights})
    with pytest.raises(LlmxError) as info:
        convert(tmp_path / "ct", tmp_path / "ckpt")
    assert "weights are asymmetric (zero points); llmx's int4 kernels are symmetric" in info.value.message

    # compressed-tensors before 0.20 wrote act-ordered GPTQ checkpoints with actorder "group" and a g_idx per Linear.
    produce(hf_dir, tmp_path / "ct2", "W4A16", torch.tensor([_ids(32, 0)]), scheme_overrides=OVERRIDES["W4A16"])
    config = json.loads((tmp_path / "ct2" / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    (tmp_path / "ct2" / "config.json").write_text(json.dumps(config))
    with pytest.raises(LlmxError) as info:
        convert(tmp_path / "ct2", tmp_path / "ckpt")
    assert "weights.actorder is 'group' (a g_idx permutation per input)" in info.value.message
    assert "\n" not in info.value.message


def test_int8_w8a8_imports_the_producers_weights_and_rounds_activations_within_one_step(hf_dir, tmp_path):
    """W8A8 maps onto int8_sq with the producer's int8 weights and scales as they are. Activations are quantized
    per token by both, on grids of absmax / 127.5 (compressed-tensors) and absmax / 127 (llmx): each Linear's
    outputs then differ by at most |W| times half a step of each grid, and the logits by that much noise."""
    from transformers import AutoModelForCausalLM

    from llmx.formats.weights import method_for

    produce(hf_dir, tmp_path / "ct", "W8A8", torch.tensor([_ids(48, 0)]))
    ckpt = read_checkpoint(convert(tmp_path / "ct", tmp_path / "ckpt", dtype="float32"))
    assert ckpt.quant.algo == "int8_sq" and ckpt.quant.exclude == ("lm_head",)
    source, got = load_file(tmp_path / "ct" / "model.safetensors"), load_file(tmp_path / "ckpt" / "rank0.safetensors")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()

    llm = _engine(tmp_path / "ckpt", tmp_path)
    ids = _ids(40, 2)
    with torch.no_grad():  # the reference's first forward decompresses its weights
        expected = reference(torch.tensor([ids])).logits[0]
        unquantized = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)(torch.tensor([ids])).logits[0]
    logits = llm.runner.prompt_logits(ids)
    # as close to the producer as the producer is to the unquantized model (measured 0.088 against 0.093)
    assert (logits - expected).abs().max() <= (expected - unquantized).abs().max()
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.9

    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3.0, 6)[:, None]
    for hf, name in (("model.layers.0.mlp.down_proj", "layers.0.mlp.down_proj"),
                     ("model.layers.1.mlp.down_proj", "layers.1.mlp.down_proj")):
        assert torch.equal(got[f"{name}.weight"], source[f"{hf}.weight"])
        assert torch.equal(got[f"{name}.weight_scale"], source[f"{hf}.weight_scale"].float().reshape(-1))
        own = {k.removeprefix(name + "."): v for k, v in got.items() if k.startswith(name + ".")}
        method = method_for(ckpt.quant, name)
        with torch.no_grad():
            ours = method.apply(own, x, None)
            theirs = reference.get_submodule(hf)(x[None])[0]  # [batch, tokens, hidden], as inside the model
        amax = x.abs().amax(dim=1, keepdim=True)
        half_steps = (amax / 127 + amax / 127.5) / 2  # [tokens, 1]
        bound = half_steps * (method.dequantize_weight(own).abs().sum(dim=1)[None, :])
        assert ((ours - theirs).abs() <= bound + 1e-5).all()
        assert (ours - theirs).abs().max() > 0  # the grids do differ: the bound is what is tested
