"""ModelOpt quantization of the Gemma family end to end: quantize -> build -> run on CPU.

Gemma's norms scale by (1 + w), so smoothing vectors (AWQ, SmoothQuant) fold into w as (1 + w) * s - 1;
the effective weights must then reproduce the original ones, and each engine must stay close to bf16.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from helpers.corpus import CORPUS
from helpers.tiny_models import make_tiny_hf_model
from llmx.formats.checkpoint import read_checkpoint
from llmx.ingest.convert import convert
from llmx.build.engine import build_engine
from llmx.quant.api import quantize
from llmx.formats.weights import method_for
from llmx.formats.config import BuildConfig
from llmx.runtime.engine import LLM

BUILD = BuildConfig(max_batch_size=4, max_seq_len=128, max_num_tokens=128, device="cpu")
# KL(bf16 engine || quantized engine) per token on held-out text, as for the dense families' tiny model.
RUNTIME_KL = {"fp8": 0.06, "int8_sq": 0.01, "int4_awq": 0.2}
# Relative error of the effective weight (dequantized weight times the norm's realised scale) to the original.
WEIGHT_ERROR = {"int8_sq": 0.02, "int4_awq": 0.15}


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gemma3-quant")
    ckpt = convert(make_tiny_hf_model("gemma3", tmp / "hf", dtype=torch.bfloat16), tmp / "ckpt", dtype="bfloat16")
    calib = tmp / "calib.txt"
    calib.write_text((CORPUS / "austen_emma.txt").read_text()[:60_000])
    made = {}

    def make(algo):
        if algo not in made:
            made[algo] = quantize(ckpt, tmp / algo, algo=algo, calib_data=str(calib), calib_size=16,
                                  calib_seq_len=64, batch_size=8, group_size=16).path
        return made[algo]

    return tmp, ckpt, make


def _logprobs(ckpt, out, ids):
    with LLM(build_engine(ckpt, out, BUILD).path) as llm:
        return torch.log_softmax(llm.runner.prompt_logits(ids), dim=-1)


@pytest.mark.parametrize("algo", sorted(WEIGHT_ERROR))
def test_smoothing_folds_into_gemma_norms_as_one_plus_w(gemma, algo):
    _, ckpt, make = gemma
    qdir = make(algo)
    source, tensors = load_file(ckpt / "rank0.safetensors"), load_file(qdir / "rank0.safetensors")
    quant = read_checkpoint(qdir).quant
    for layer in range(3):
        for module, norm in ((f"layers.{layer}.attn.q_proj", f"layers.{layer}.attn_norm.weight"),
                             (f"layers.{layer}.mlp.up_proj", f"layers.{layer}.mlp_norm.weight")):
            own = {k.removeprefix(module + "."): v for k, v in tensors.items() if k.startswith(module + ".")}
            weight = method_for(quant, module).dequantize_weight(own).float()
            realised = (1 + tensors[norm].float()) / (1 + source[norm].float())
            assert (realised - 1).abs().max().item() > 0.01, "the smoothing vector should move the norm"
            original = source[f"{module}.weight"].float()
            error = ((weight * realised - original).norm() / original.norm()).item()
            assert error < WEIGHT_ERROR[algo], (module, error)


def test_every_gemma_engine_runs_close_to_bf16(gemma):
    tmp, ckpt, make = gemma
    ids = load_ids(ckpt)
    base = _logprobs(ckpt, tmp / "engine-bf16", ids)
    kl = {}
    for algo in RUNTIME_KL:
        logprobs = _logprobs(make(algo), tmp / f"engine-{algo}", ids)
        kl[algo] = (base.exp() * (base - logprobs)).sum(-1).mean().item()
    assert all(kl[a] < RUNTIME_KL[a] for a in kl), kl


def load_ids(ckpt) -> list[int]:
    """Held-out text (past the 60,000 calibration characters) in the checkpoint's own tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    return tokenizer.encode((CORPUS / "austen_emma.txt").read_text()[80_000:80_600])[:96]


def test_phi3_quantization_is_refused_in_one_sentence(tmp_path):
    from llmx.common.errors import LlmxError

    ckpt = convert(make_tiny_hf_model("phi3", tmp_path / "hf"), tmp_path / "ckpt", dtype="bfloat16")
    with pytest.raises(LlmxError, match="quantizing Phi3ForCausalLM is not supported yet"):
        quantize(ckpt, tmp_path / "q", algo="int8_wo")


def test_gemma_modelopt_hf_folder_round_trips_to_the_same_checkpoint(gemma):
    """nvfp4 written as a ModelOpt HF folder (transformers' Gemma names, its four norms) and imported by convert:
    bit for bit the checkpoint quantize writes directly (as for the dense families' nvfp4)."""
    tmp, ckpt, make = gemma
    hf = tmp / "nvfp4-hf"
    quantize(ckpt, hf, algo="nvfp4", calib_data=str(tmp / "calib.txt"), calib_size=16, calib_seq_len=64,
             batch_size=8, group_size=16, export_format="hf")
    imported = load_file(convert(hf, tmp / "nvfp4-imported", dtype="bfloat16") / "rank0.safetensors")
    native = load_file(make("nvfp4") / "rank0.safetensors")
    assert set(imported) == set(native) and any("post_mlp_norm" in n for n in native)
    for name, tensor in native.items():
        assert imported[name].dtype == tensor.dtype and torch.equal(imported[name].float(), tensor.float()), name
