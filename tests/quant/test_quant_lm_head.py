"""`quantize(..., quantize_lm_head=True)` / `llmx quantize --quantize-lm-head`: the LM head quantized like the layers.

Plan and ModelOpt config, the refusals (tied head, an --exclude matching lm_head), then end to end on a tiny
untied Llama: the checkpoint stores the head in the quantized format with AWQ/SmoothQuant's vector folded into
final_norm, `llmx build` + the runtime run it with the quantized method and logits close to the same model
with a bf16 head, GPTQ really runs on the head, and the HF export carries it through `llmx convert`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmx.formats.checkpoint import read_checkpoint, verify_checkpoint
from llmx.common.errors import LlmxError
from llmx.formats import presets
from llmx.quant import api
from llmx.quant.api import quantize
from llmx.formats.weights import method_for
from llmx.formats.config import ModelConfig

from helpers.corpus import CORPUS

CALIB = dict(calib_size=16, calib_seq_len=64, batch_size=8, group_size=32)
VOCAB, HIDDEN = 256, 64  # the tiny models' head: [256, 64]
CONFIG = ModelConfig(architecture="LlamaForCausalLM", family="llama", vocab_size=VOCAB, hidden_size=HIDDEN,
                     intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                     max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0)


# Plan and ModelOpt config (no ModelOpt, no model) ------------------------------------------------------


@pytest.mark.parametrize("algo", ["int4_awq", "fp8"])
def test_the_flag_plans_the_head_and_drops_it_from_exclude(algo):
    group = presets.effective_group_size(algo, 32)
    default = api.plan_modules(CONFIG, algo, (), group)
    assert "lm_head" in default.skipped and "lm_head" not in default.quantized
    assert api._quant_config(algo, group, None, (), default).exclude == ("lm_head",)

    plan = api.plan_modules(CONFIG, algo, ("layers.1.mlp.*",), group, quantize_lm_head=True)
    assert plan.quantized[-1] == "lm_head" and "lm_head" not in plan.skipped
    quant = api._quant_config(algo, group, None, ("layers.1.mlp.*",), plan, quantize_lm_head=True)
    assert quant.exclude == ("layers.1.mlp.*",)
    assert method_for(quant, "lm_head").name == method_for(quant, "layers.0.attn.q_proj").name != "unquantized"
    assert "lm_head" not in json.dumps(quant.extra)  # the head's smoothing is folded, never kept


@pytest.mark.parametrize("algo", ["int4_awq", "fp8", "w4a8_awq", "int8_sq"])
def test_modelopt_config_gives_the_head_the_layers_settings(algo):
    group = presets.effective_group_size(algo, 32)

    def cfg(entries, name):
        return [e.get("cfg") for e in entries if e["quantizer_name"] == name]

    off = presets.modelopt_config(algo, group_size=group, kv_cache_dtype=None, disabled_modules=["lm_head"])
    assert not [e for e in off["quant_cfg"] if e["quantizer_name"].startswith("lm_head") and e.get("enable", True)]
    on = presets.modelopt_config(algo, group_size=group, kv_cache_dtype=None, disabled_modules=[],
                                 quantize_lm_head=True)["quant_cfg"]
    layer = presets.LAYER_LINEARS
    assert cfg(on, "lm_head.weight_quantizer") == cfg(on, f"{layer}.weight_quantizer") != []
    assert cfg(on, "lm_head.input_quantizer") == cfg(on, f"{layer}.input_quantizer")
    assert bool(cfg(on, "lm_head.input_quantizer")) == (presets.PRESETS[algo].input is not None)


# Refusals ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Any attempt to open (or convert) the source checkpoint fails the test: refusals come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("quantize() started loading the model before refusing the options")

    monkeypatch.setattr(api, "_source_checkpoint", refuse)


def test_a_tied_head_is_refused_before_any_work(tiny_model_dir, tmp_path, no_heavy_work):
    from llmx.ingest.convert import convert

    hf = tiny_model_dir("llama", tie=True)
    ckpt = convert(hf, tmp_path / "ckpt")
    for src, field in ((hf, "tie_word_embeddings"), (ckpt, "model.tie_word_embeddings")):
        with pytest.raises(LlmxError) as info:
            quantize(src, tmp_path / "out", algo="int8_wo", quantize_lm_head=True)
        message = info.value.message
        assert "\n" not in message and f"`{field}` true" in message and "input embedding" in message, message


@pytest.mark.parametrize("pattern", ["lm_head", "lm_*", "*"])
def test_an_exclude_matching_the_head_contradicts_the_flag(tmp_path, no_heavy_work, pattern):
    with pytest.raises(LlmxError, match=f"--exclude '{pattern.replace('*', '[*]')}' leaves lm_head unquantized and "
                                        "--quantize-lm-head quantizes it: the two options contradict"):
        quantize(tmp_path / "ckpt", tmp_path / "out", algo="int8_wo", exclude=(pattern,), quantize_lm_head=True)


def test_the_flag_needs_a_weight_format(tmp_path, no_heavy_work):
    with pytest.raises(LlmxError, match="--algo none quantizes no weights"):
        quantize(tmp_path / "ckpt", tmp_path / "out", algo="none", kv_cache_dtype="fp8", calib_data="x.txt",
                 quantize_lm_head=True)


# End to end on a tiny untied Llama ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("lm-head")


@pytest.fixture(scope="module")
def hf_dir(workdir):
    """A tiny untied Llama whose norms (final_norm too) have a few large channels, so the head's input has
    outliers and AWQ/SmoothQuant give it a far-from-one smoothing vector: a wrong fold shows in the logits."""
    from helpers.tiny_models import make_outlier_llama

    hf = make_outlier_llama(workdir / "hf", final_norm=True)
    assert "lm_head.weight" in load_file(hf / "model.safetensors")
    return hf


@pytest.fixture(scope="module")
def quantized(workdir, ckpt, calib_file):
    """(algo, head) -> (output dir, QuantizeResult), made once."""
    made = {}

    def make(algo: str, head: bool, export_format: str = "llmx"):
        key = (algo, head, export_format)
        if key not in made:
            out = workdir / f"{algo}-{'head' if head else 'nohead'}-{export_format}"
            made[key] = (out, quantize(ckpt, out, algo=algo, calib_data=str(calib_file), quantize_lm_head=head,
                                       export_format=export_format, **CALIB))
        return made[key]

    return make


@pytest.fixture(scope="module")
def runtime(workdir):
    """checkpoint dir -> (log-probabilities [T, vocab] of the CPU engine on held-out text, the LM head's method)."""
    from llmx.build.engine import build_engine
    from llmx.formats.config import BuildConfig
    from llmx.runtime.engine import LLM

    text = (CORPUS / "austen_persuasion.txt").read_text()[:5000]
    count = iter(range(1000))

    def run(ckpt_dir: Path):
        build = BuildConfig(max_batch_size=1, max_seq_len=128, max_num_tokens=128, device="cpu")
        engine = build_engine(ckpt_dir, workdir / f"engine-{next(count)}", build).path
        llm = LLM(engine, device="cpu", kv_cache_tokens=128)
        ids = llm.tokenizer.encode(text, add_special_tokens=False)[:128]
        return llm.runner.prompt_logits(ids).float().log_softmax(-1), llm.runner.model.lm_head.method

    return run


def effective_head(qdir: Path, source: dict) -> torch.Tensor:
    """The float matrix the quantized head applies to the ORIGINAL final-norm output: the dequantized head times
    the factor folded into final_norm (and any pre_quant_scale it kept)."""
    tensors = load_file(qdir / "rank0.safetensors")
    own = {k.removeprefix("lm_head."): v for k, v in tensors.items() if k.startswith("lm_head.")}
    w = method_for(read_checkpoint(qdir).quant, "lm_head").dequantize_weight(own)
    if "pre_quant_scale" in own:
        w = w * own["pre_quant_scale"].float()
    return w * (tensors["final_norm.weight"].float() / source["final_norm.weight"].float())


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype.itemsize == 1:  # float8 has no torch.equal: compare the bytes
        return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return (p.exp() * (p - q)).sum(-1).mean().item()


# algo -> (stored head tensors (shape, dtype), effective-weight error bound, KL bound against the same
# checkpoint with a bf16 head). Measured: int4_awq 0.11 / 0.008, fp8 0.03 / 0.003, int8_sq 0.01 / 0.0001,
# int4_gptq 0.16 / 0.010, w4a8_awq 0.11 / 0.009, nvfp4 0.10 / 0.015; a fold that scales final_norm without
# dividing the head's weights (or the reverse) gives 0.29-0.39 / 0.13-0.17 for AWQ, 0.7-3.0 / 0.9-14 for
# SmoothQuant.
HEAD = {
    "int4_awq": ({"weight": ((VOCAB, HIDDEN // 2), torch.uint8), "weight_scale": ((VOCAB, 2), torch.bfloat16)},
                 0.2, 0.04),
    "fp8": ({"weight": ((VOCAB, HIDDEN), torch.float8_e4m3fn), "weight_scale": ((), torch.float32),
             "input_scale": ((), torch.float32)}, 0.06, 0.02),
    "int8_sq": ({"weight": ((VOCAB, HIDDEN), torch.int8), "weight_scale": ((VOCAB,), torch.float32)}, 0.05, 0.01),
    "int4_gptq": ({"weight": ((VOCAB, HIDDEN // 2), torch.uint8), "weight_scale": ((VOCAB, 2), torch.bfloat16)},
                  0.25, 0.04),
    "w4a8_awq": ({"weight": ((VOCAB, HIDDEN // 2), torch.uint8), "weight_scale": ((VOCAB, 2), torch.bfloat16),
                  "input_scale": ((), torch.float32)}, 0.2, 0.04),
    "nvfp4": ({"weight": ((VOCAB, HIDDEN // 2), torch.uint8),
               "weight_scale": ((VOCAB, HIDDEN // 16), torch.float8_e4m3fn),
               "weight_scale_2": ((), torch.float32), "input_scale": ((), torch.float32)}, 0.2, 0.04),
}
SMOOTHED = ("int4_awq", "int8_sq", "w4a8_awq")


@pytest.mark.parametrize("algo", sorted(HEAD))
def test_quantized_head_end_to_end(algo, quantized, ckpt, runtime):
    """quantize -> checkpoint with the head in the format (smoothing folded into final_norm) -> build -> runtime."""
    stored, weight_bound, kl_bound = HEAD[algo]
    out, result = quantized(algo, head=True)
    base_out, _ = quantized(algo, head=False)
    checkpoint = read_checkpoint(out)
    verify_checkpoint(checkpoint)
    assert checkpoint.quant.exclude == () and result.skipped_modules == []
    assert result.quantized_modules[-1] == "lm_head"

    tensors, base = load_file(out / "rank0.safetensors"), load_file(base_out / "rank0.safetensors")
    head = {k.removeprefix("lm_head."): v for k, v in tensors.items() if k.startswith("lm_head.")}
    assert {k: (tuple(v.shape), v.dtype) for k, v in head.items()} == stored
    # The flag changes the head and the norm in front of it, nothing else.
    changed = [n for n in tensors if not n.startswith("lm_head.") and not _same(tensors[n], base[n])]
    assert changed == (["final_norm.weight"] if algo in SMOOTHED else [])

    source = load_file(ckpt / "rank0.safetensors")
    original = source["lm_head.weight"].float()
    err = ((effective_head(out, source) - original).norm() / original.norm()).item()
    assert err < weight_bound, err

    with_head, method = runtime(out)
    bf16_head, base_method = runtime(base_out)
    assert method.name == method_for(checkpoint.quant, "layers.0.mlp.up_proj").name and base_method.name == "unquantized"
    divergence = kl(bf16_head, with_head)
    assert 0 < divergence < kl_bound, divergence


def test_a_quantized_head_shards_over_tensor_parallel_ranks(tiny_model_dir, tmp_path):
    """tp=2 on a vocabulary tp does not divide: each rank holds ceil(251 / 2) rows of the int4 head, the last
    one zero-padded, and the two ranks compute the tp=1 logits."""
    from llmx.ingest.convert import convert
    from llmx.build.engine import build_engine
    from llmx.formats.config import BuildConfig, Mapping
    from llmx.runtime.engine import LLM

    fp32 = convert(tiny_model_dir("llama", vocab_size=251), tmp_path / "ckpt", dtype="float32")
    ckpt = quantize(fp32, tmp_path / "q", algo="int4_wo", group_size=32, quantize_lm_head=True).path
    assert load_file(ckpt / "rank0.safetensors")["lm_head.weight"].shape == (251, HIDDEN // 2)
    build = BuildConfig(max_batch_size=2, max_seq_len=64, max_num_tokens=64, kv_block_size=16, device="cpu")
    ids = list(range(3, 40))
    logits = []
    for mapping in (Mapping(), Mapping(tp=2)):
        engine = build_engine(ckpt, tmp_path / f"tp{mapping.tp}", build, mapping).path
        with LLM(engine, kv_cache_tokens=256) as llm:
            logits.append(llm.runner.prompt_logits(ids))
    assert logits[0].shape == (len(ids), 251)
    assert (logits[1] - logits[0]).abs().max().item() <= 1e-4


def _head_inputs(hf_dir: Path) -> torch.Tensor:
    """The final-norm output the unquantized transformers model feeds its head on held-out text: [T, hidden]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ids = AutoTokenizer.from_pretrained(hf_dir)((CORPUS / "austen_persuasion.txt").read_text()[:20_000])["input_ids"]
    seen = []
    model.lm_head.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(torch.tensor(ids[:512]).reshape(8, 64))
    return seen[0]


def test_gptq_updates_the_head_beyond_round_to_nearest(quantized, ckpt, hf_dir):
    """ModelOpt's layerwise GPTQ skips the head (it would stay round-to-nearest); llmx runs GPTQ on it afterwards."""
    from llmx.kernels.w4a16_format import unpack_int4
    from llmx.formats.weights.int4 import dequantize_int4, quantize_int4

    out, _ = quantized("int4_gptq", head=True)
    source = load_file(ckpt / "rank0.safetensors")
    original = source["lm_head.weight"].float()
    gptq = load_file(out / "rank0.safetensors")
    rtn = quantize_int4(original, 32, "bfloat16")
    changed = (unpack_int4(gptq["lm_head.weight"]) != unpack_int4(rtn["weight"])).float().mean().item()
    assert 0.05 < changed < 0.9, changed
    x = _head_inputs(hf_dir)
    ref = x @ original.t()

    def error(w):
        return (((x @ w.t()) - ref) ** 2).mean().item() / (ref ** 2).mean().item()

    gptq_w = dequantize_int4({"weight": gptq["lm_head.weight"], "weight_scale": gptq["lm_head.weight_scale"]})
    assert error(gptq_w) < 0.8 * error(dequantize_int4(rtn))


@pytest.mark.parametrize("algo", ["int4_awq", "fp8"])
def test_hf_export_carries_the_head_and_convert_imports_it(algo, quantized, ckpt, workdir, runtime):
    """ModelOpt's HF folder holds the head quantized (AWQ keeps its vector there: the import folds it into the
    final norm); `llmx convert` of it gives a checkpoint with the same quantized head as `llmx quantize`."""
    from llmx.ingest.convert import convert

    hf, _ = quantized(algo, head=True, export_format="hf")
    config = json.loads((hf / "hf_quant_config.json").read_text())["quantization"]
    assert not any("lm_head" in m for m in config.get("exclude_modules") or [])
    from safetensors import safe_open

    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight_scale" in names and ("lm_head.pre_quant_scale" in names) == (algo == "int4_awq")

    imported = convert(hf, workdir / f"imported-{algo}")
    checkpoint = read_checkpoint(imported)
    verify_checkpoint(checkpoint)
    assert "lm_head" not in checkpoint.quant.exclude and method_for(checkpoint.quant, "lm_head").name != "unquantized"
    source = load_file(ckpt / "rank0.safetensors")
    direct, _ = quantized(algo, head=True)
    a, b = effective_head(direct, source), effective_head(imported, source)
    assert ((a - b).norm() / a.norm()).item() < 0.06
    # Against the import of the same export without the flag (whose layers are the same): the head's own cost.
    imported_bf16_head = convert(quantized(algo, head=False, export_format="hf")[0], workdir / f"imported-{algo}-nohead")
    with_head, method = runtime(imported)
    bf16_head, base_method = runtime(imported_bf16_head)
    assert method.name != "unquantized" and base_method.name == "unquantized"
    assert 0 < kl(bf16_head, with_head) < HEAD[algo][2]


# CLI flag and recipe field --------------------------------------------------------------------------------


@pytest.fixture
def captured_quantize(monkeypatch, tmp_path):
    """Replace llmx.quant.api.quantize; returns the kwargs of each call."""
    calls = []

    def fake(src, out, **kwargs):
        calls.append(kwargs)
        return api.QuantizeResult(path=Path(out), algo=kwargs["algo"], quantized_modules=[], skipped_modules=[],
                                  size_before_bytes=1, size_after_bytes=1, seconds=0.0, calib_data_hash=None)

    monkeypatch.setattr(api, "quantize", fake)
    return calls


@pytest.mark.parametrize("recipe_value, flags, expected", [
    (None, [], False),
    (None, ["--quantize-lm-head"], True),
    (True, [], True),
    (True, ["--no-quantize-lm-head"], False),
    (False, ["--quantize-lm-head"], True),
])
def test_cli_flag_and_recipe_field_reach_quantize(captured_quantize, tmp_path, capsys, recipe_value, flags,
                                                  expected):
    from llmx.cli.main import run_cli

    argv = ["quantize", str(tmp_path / "ckpt"), "-o", str(tmp_path / "q"), "--algo", "int8_wo", "--device", "cpu",
            "--json", *flags]
    if recipe_value is not None:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"family: llama\ntarget: cpu\nquantize: {{quantize_lm_head: {str(recipe_value).lower()}}}\n")
        argv += ["--recipe", str(recipe)]
    assert run_cli(argv) == 0, capsys.readouterr().err
    assert captured_quantize[-1]["quantize_lm_head"] is expected


def test_recipe_field_is_validated(tmp_path):
    from llmx.recipes import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("family: llama\ntarget: cpu\nquantize: {quantize_lm_head: 'yes'}\n")
    with pytest.raises(LlmxError, match="`quantize.quantize_lm_head`: Input should be a valid boolean"):
        load_recipe(path)
    path.write_text("family: llama\ntarget: cpu\nquantize: {quantize_lm_head: true, exclude: ['lm_*']}\n")
    with pytest.raises(LlmxError, match=r"`quantize.quantize_lm_head` is true but `quantize.exclude` 'lm_\*' leaves "
                                        "lm_head unquantized: the two contradict"):
        load_recipe(path)
    path.write_text("family: llama\ntarget: cpu\nquantize: {quantize_lm_head: true, exclude: ['layers.0.*']}\n")
    recipe, _ = load_recipe(path)
    assert recipe.section("quantize") == {"quantize_lm_head": True, "exclude": ["layers.0.*"]}


def test_cli_help_states_the_cost_and_the_tied_limit(capsys):
    from llmx.cli.main import run_cli

    assert run_cli(["quantize", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "--quantize-lm-head" in text and "tied to the input embedding" in text and "QUANTIZATION.md" in text
    assert "always left unquantized" not in text
