"""`quantize()` end to end on a tiny Llama on CPU: every algorithm writes a checkpoint that matches its specs and
whose weights stay close to the originals; AWQ and GPTQ beat round-to-nearest on real activations; every
bad input gets its one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmx.formats.checkpoint import read_checkpoint, verify_checkpoint
from llmx.common.errors import LlmxError
from llmx.quant.api import quantize
from llmx.formats.weights import method_for

from helpers.corpus import CORPUS

NORMS = {"attn": "attn_norm", "mlp": "mlp_norm"}
FUSED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
# Relative Frobenius error of the effective weights, per format (int4 groups of 32 on Gaussian weights ~0.1).
WEIGHT_ERROR = {"fp8": 0.06, "fp8_pc_pt": 0.06, "int8_sq": 0.03, "int8_wo": 0.02, "int4_wo": 0.13,
                "int4_awq": 0.25, "int4_gptq": 0.25, "w4a8_awq": 0.25, "nvfp4": 0.2}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("quant-api")


@pytest.fixture(scope="module")
def hf_dir(workdir):
    from helpers.tiny_models import make_outlier_llama

    return make_outlier_llama(workdir / "hf")


@pytest.fixture(scope="module")
def quantized(workdir, ckpt, calib_file):
    """algo -> (output dir, QuantizeResult), made once per algorithm."""
    made = {}

    def make(algo, **kwargs):
        key = (algo, tuple(sorted(kwargs.items())))
        if key not in made:
            out = workdir / f"q-{algo}-{len(made)}"
            args = dict(calib_data=str(calib_file), calib_size=16, calib_seq_len=64, batch_size=8, group_size=32)
            args.update(kwargs)
            made[key] = (out, quantize(ckpt, out, algo=algo, **args))
        return made[key]

    return make


def effective_weight(qdir: Path, source: dict, module: str) -> torch.Tensor:
    """The float weight the quantized checkpoint multiplies the original norm output by: dequantized weight
    times its input scaling (the factor folded into the norm, or the stored pre_quant_scale)."""
    ckpt = read_checkpoint(qdir)
    tensors = load_file(qdir / "rank0.safetensors")
    prefix = module + "."
    own = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    w = method_for(ckpt.quant, module).dequantize_weight(own)
    if "pre_quant_scale" in own:
        w = w * own["pre_quant_scale"].float()
    _, layer, block, proj = module.split(".")
    if proj in FUSED:
        norm = f"layers.{layer}.{NORMS[block]}.weight"
        w = w * (tensors[norm].float() / source[norm].float())
    return w


@pytest.mark.parametrize("algo", sorted(WEIGHT_ERROR))
def test_every_algorithm_writes_a_valid_close_checkpoint(algo, quantized, ckpt):
    out, result = quantized(algo)
    checkpoint = read_checkpoint(out)
    verify_checkpoint(checkpoint)
    assert checkpoint.quant.algo == algo and checkpoint.quant.exclude == ("lm_head",)
    assert result.quantized_modules == [f"layers.{i}.{b}.{p}" for i in range(2) for b, p in (
        ("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj"), ("attn", "o_proj"),
        ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))]
    assert result.skipped_modules == ["lm_head"]
    assert result.size_after_bytes < result.size_before_bytes
    provenance = checkpoint.provenance
    assert provenance["modelopt_version"]
    assert provenance["source_hash"].startswith("sha256:")
    assert provenance["calib_data_hash"] == result.calib_data_hash
    calibrated = algo not in ("int8_wo", "int4_wo", "fp8_pc_pt")
    assert (result.calib_data_hash is not None) == calibrated
    source = load_file(ckpt / "rank0.safetensors")
    for module in result.quantized_modules:
        original = source[f"{module}.weight"].float()
        err = (effective_weight(out, source, module) - original).norm() / original.norm()
        assert err < WEIGHT_ERROR[algo], module
    for name in ("embed.weight", "final_norm.weight", "lm_head.weight"):
        assert torch.equal(load_file(out / "rank0.safetensors")[name], source[name])
    assert (out / "tokenizer.json").is_file()


def _layer_inputs(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Each Linear's input on held-out text, from the unquantized transformers model: llmx name -> [T, K]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(hf_dir)((CORPUS / "austen_persuasion.txt").read_text()[:20_000])["input_ids"]
    inputs, hooks = {}, []
    for name, module in model.named_modules():
        if name.endswith("_proj"):
            llmx = name.removeprefix("model.").replace("self_attn", "attn")
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, llmx=llmx: inputs.__setitem__(llmx, args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        model(torch.tensor(ids[:512]).reshape(8, 64))
    return inputs


def test_awq_and_gptq_beat_round_to_nearest_on_real_activations(quantized, ckpt, hf_dir):
    source = load_file(ckpt / "rank0.safetensors")
    inputs = _layer_inputs(hf_dir)
    error = {}
    for algo in ("int4_wo", "int4_awq", "int4_gptq"):
        out, _ = quantized(algo)
        per_layer = []
        for module, x in inputs.items():
            ref = x @ source[f"{module}.weight"].float().t()
            y = x @ effective_weight(out, source, module).t()
            per_layer.append(((y - ref) ** 2).mean() / (ref ** 2).mean())
        error[algo] = torch.stack(per_layer).mean().item()
    assert error["int4_awq"] < 0.8 * error["int4_wo"], error
    assert error["int4_gptq"] < 0.8 * error["int4_wo"], error


@pytest.fixture(scope="module")
def runtime_logprobs(workdir):
    """Path -> log-probabilities [T, vocab] the llmx runtime computes for a fixed text (engine built on CPU)."""
    from llmx.build.engine import build_engine
    from llmx.formats.config import BuildConfig
    from llmx.runtime.engine import LLM

    text = (CORPUS / "austen_persuasion.txt").read_text()[:5000]
    count = iter(range(1000))

    def run(ckpt_dir: Path) -> torch.Tensor:
        build = BuildConfig(max_batch_size=1, max_seq_len=128, max_num_tokens=128, device="cpu")
        engine = build_engine(ckpt_dir, workdir / f"engine-{next(count)}", build).path
        llm = LLM(engine, device="cpu", kv_cache_tokens=128)
        ids = llm.tokenizer.encode(text, add_special_tokens=False)[:128]
        return llm.runner.prompt_logits(ids).float().log_softmax(-1)

    return run


# KL(bf16 engine || quantized engine) per token on held-out text; a broken format gives KL > 1.
RUNTIME_KL = {"fp8": 0.06, "fp8_pc_pt": 0.06, "int8_sq": 0.005, "int8_wo": 0.005, "int4_wo": 0.2,
              "int4_awq": 0.2, "int4_gptq": 0.2, "w4a8_awq": 0.2, "nvfp4": 0.2}


def test_runtime_runs_every_format_close_to_bf16(quantized, ckpt, runtime_logprobs):
    """build (fuses q/k/v and gate/up via fuse_outputs) + runtime (QuantMethod.apply) on every checkpoint."""
    base = runtime_logprobs(ckpt)
    kl = {}
    for algo in RUNTIME_KL:
        logprobs = runtime_logprobs(quantized(algo)[0])
        kl[algo] = (base.exp() * (base - logprobs)).sum(-1).mean().item()
    assert all(kl[a] < RUNTIME_KL[a] for a in kl), kl
    assert kl["int4_awq"] < kl["int4_wo"] and kl["int4_gptq"] < kl["int4_wo"], kl


def test_gptq_moves_weights_off_round_to_nearest(quantized):
    """GPTQ compensates rounding errors column by column: its codes differ from plain rounding, no AWQ scale."""
    from llmx.kernels.w4a16_format import unpack_int4

    gptq = load_file(quantized("int4_gptq")[0] / "rank0.safetensors")
    rtn = load_file(quantized("int4_wo")[0] / "rank0.safetensors")
    name = "layers.0.mlp.down_proj"
    assert "pre_quant_scale" not in {k.rsplit(".", 1)[1] for k in gptq if k.startswith(name)}
    changed = (unpack_int4(gptq[f"{name}.weight"]) != unpack_int4(rtn[f"{name}.weight"])).float().mean().item()
    assert 0.05 < changed < 0.9


def test_kv_cache_scales_on_top_of_weights_and_alone(quantized):
    out, _ = quantized("int8_wo", kv_cache_dtype="int8")
    tensors = load_file(out / "rank0.safetensors")
    assert read_checkpoint(out).quant.kv_cache_dtype == "int8"
    assert tensors["layers.1.attn.k_scale"].dtype == torch.float32 and tensors["layers.1.attn.k_scale"] > 0
    out, result = quantized("none", kv_cache_dtype="fp8")
    checkpoint = read_checkpoint(out)
    verify_checkpoint(checkpoint)
    assert checkpoint.quant.algo == "none" and result.quantized_modules == []
    assert load_file(out / "rank0.safetensors")["layers.0.attn.v_scale"].item() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("algo", ["nvfp4", "int4_awq", "fp8"])
def test_calibrating_on_the_gpu_gives_the_cpu_checkpoint(algo, workdir, ckpt, calib_file, quantized):
    """On CUDA, ModelOpt fake-quantizes NVFP4 with its own kernels; the stored checkpoint must not change."""
    cpu_out, _ = quantized(algo)
    gpu_out = workdir / f"gpu-{algo}"
    quantize(ckpt, gpu_out, algo=algo, calib_data=str(calib_file), calib_size=16, calib_seq_len=64, batch_size=8,
             group_size=32, device="cuda", force=True)
    verify_checkpoint(read_checkpoint(gpu_out))
    source = load_file(ckpt / "rank0.safetensors")
    for module in ("layers.0.attn.q_proj", "layers.1.mlp.down_proj"):
        a, b = effective_weight(cpu_out, source, module), effective_weight(gpu_out, source, module)
        assert (a - b).norm() / a.norm() < 0.05, module


def test_quantize_an_hf_folder_directly(workdir, hf_dir):
    out = workdir / "from-hf"
    result = quantize(hf_dir, out, algo="int8_wo")
    verify_checkpoint(read_checkpoint(out))
    assert result.calib_data_hash is None


def test_progress_reports_every_stage(workdir, ckpt, calib_file):
    stages = {}
    quantize(ckpt, workdir / "progress", algo="fp8", calib_data=str(calib_file), calib_size=4, calib_seq_len=32,
             progress=lambda stage, done, total: stages.__setitem__(stage, (done, total)))
    assert stages["calibrate"] == (1, 1)
    assert stages["export"] == (2, 2)
    assert stages["load"][0] == stages["load"][1]


# Bad inputs ------------------------------------------------------------------------------------------


def test_unknown_algo_lists_valid_ones(workdir, ckpt):
    with pytest.raises(LlmxError, match="'int3' is not a quantization algorithm; choose one of fp8, fp8_pc_pt"):
        quantize(ckpt, workdir / "x", algo="int3")


def test_already_quantized_source_is_refused(workdir, quantized):
    out, _ = quantized("int8_wo")
    with pytest.raises(LlmxError, match="already quantized \\(algo int8_wo\\)"):
        quantize(out, workdir / "again", algo="int8_wo")


def test_calibrating_algorithm_without_data_offline_names_the_flag(workdir, ckpt, monkeypatch):
    """Without --calib-data the default hub set is read; offline and not cached, one sentence names the flag."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(workdir / "empty-hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LlmxError, match=r"\(abisee/cnn_dailymail; the default without --calib-data\) is not in the "
                                        r"hub cache .* or pass --calib-data with a local"):
        quantize(ckpt, workdir / "x", algo="awq")
    assert not (workdir / "x").exists()


@pytest.mark.parametrize("content, match", [(None, "does not exist"), ("", "is empty")])
def test_calibration_file_missing_or_empty(workdir, ckpt, content, match):
    path = workdir / "bad-calib.txt"
    path.unlink(missing_ok=True)
    if content is not None:
        path.write_text(content)
    with pytest.raises(LlmxError, match=match):
        quantize(ckpt, workdir / "x", algo="fp8", calib_data=str(path))


def test_group_size_that_does_not_divide_names_the_module(workdir, ckpt):
    with pytest.raises(LlmxError, match="layers.0.attn.q_proj has 64 input features, which the group size 128"):
        quantize(ckpt, workdir / "x", algo="int4_wo", group_size=128)


def test_without_a_group_size_the_largest_that_fits_is_chosen_and_recorded(quantized):
    """The tiny model's Linears take 64 (hidden) and 128 (intermediate) inputs: 128 does not fit q_proj, 64 does."""
    out, result = quantized("int4_wo", group_size=None)
    assert (result.group_size, result.group_size_chosen) == (64, True)
    assert read_checkpoint(out).quant.group_size == 64
    _, given = quantized("int4_wo")
    assert (given.group_size, given.group_size_chosen) == (32, False)


def test_exclude_matching_nothing_is_a_warning(quantized):
    out, result = quantized("int8_wo", exclude=("layers.9.*", "layers.1.mlp.down_proj"))
    assert any("'layers.9.*' matches no Linear module" in w for w in result.warnings)
    assert "layers.1.mlp.down_proj" in result.skipped_modules
    tensors = load_file(out / "rank0.safetensors")
    assert tensors["layers.1.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert tensors["layers.0.mlp.down_proj.weight"].dtype == torch.int8


def test_excluding_part_of_a_fused_group_is_refused(workdir, ckpt):
    with pytest.raises(LlmxError, match="skips layers.0.attn.k_proj but not layers.0.attn.q_proj"):
        quantize(ckpt, workdir / "x", algo="int8_wo", exclude=("layers.0.attn.k_proj",))


def test_interrupted_run_leaves_no_output(workdir, ckpt, calib_file):
    out = workdir / "interrupted"

    def interrupt(stage, done, total):
        if stage == "export":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize(ckpt, out, algo="int8_wo", progress=interrupt)
    assert not out.exists()
    assert not [p for p in workdir.iterdir() if p.name.startswith(".interrupted")]


def test_output_dir_with_other_files_is_refused_unless_forced(workdir, ckpt):
    out = workdir / "occupied"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(LlmxError, match="already holds files that llmx did not write"):
        quantize(ckpt, out, algo="int8_wo")
    quantize(ckpt, out, algo="int8_wo", force=True)
    assert not (out / "notes.txt").exists() and (out / "llmx.json").is_file()


def test_kv_only_needs_a_kv_dtype(workdir, ckpt):
    with pytest.raises(LlmxError, match="--algo none quantizes nothing"):
        quantize(ckpt, workdir / "x", algo="none")


def test_bad_export_format_and_device(workdir, ckpt):
    with pytest.raises(LlmxError, match="--export-format 'gguf'"):
        quantize(ckpt, workdir / "x", algo="int8_wo", export_format="gguf")
    with pytest.raises(LlmxError, match="--device 'tpu'"):
        quantize(ckpt, workdir / "x", algo="int8_wo", device="tpu")


def test_provenance_records_calibration_settings(quantized, calib_file):
    out, _ = quantized("fp8")
    calibration = json.loads((out / "llmx.json").read_text())["provenance"]["calibration"]
    assert calibration == {"data": str(calib_file), "samples": 16, "requested_samples": 16, "seq_len": 64, "seed": 0}
