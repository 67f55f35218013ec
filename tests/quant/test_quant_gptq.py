"""llmx's GPTQ (quant/gptq.py): on the int4 grid export reads back, better than round-to-nearest on correlated
inputs with and without activation order, and its settings refused in one sentence when out of range."""

from __future__ import annotations

import pytest
import torch

from llmx.common.errors import LlmxError
from llmx.quant.gptq import GptqSettings, HessianAccumulator, gptq_quantize, stage_of
from llmx.formats.weights.int4 import dequantize_int4, quantize_int4

GROUP = 32


def correlated_inputs(rows: int, features: int, seed: int) -> torch.Tensor:
    """Activations as a decoder layer sees them: strongly correlated channels (one mixing for every draw), a few
    channels of large magnitude; `seed` draws other rows from the same distribution."""
    mixing = torch.randn(features, features, generator=torch.Generator().manual_seed(123)) / features ** 0.5
    x = torch.randn(rows, features, generator=torch.Generator().manual_seed(seed)) @ (torch.eye(features) + 2 * mixing)
    x[:, :4] *= 8.0  # outlier channels
    return x


@pytest.fixture(scope="module")
def case():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 128, generator=g) * 0.05
    calib, heldout = correlated_inputs(2048, 128, 1), correlated_inputs(1024, 128, 2)
    acc = HessianAccumulator(128)
    for chunk in calib.split(256):  # several batches, as the calibration loop feeds them
        acc.add(chunk.reshape(4, 64, 128))
    return weight, acc.hessian(), heldout


def rtn(weight: torch.Tensor) -> torch.Tensor:
    return dequantize_int4(quantize_int4(weight, GROUP, "float32"))


def output_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ (approx - weight).T).pow(2).mean() / (x @ weight.T).pow(2).mean())


def test_hessian_is_the_mean_outer_product_of_every_row():
    x = torch.randn(3, 5, 8)
    acc = HessianAccumulator(8)
    acc.add(x[:2])
    acc.add(x[2:])
    flat = x.reshape(-1, 8).double()
    torch.testing.assert_close(acc.hessian(), flat.T @ flat / 15)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_weights_sit_on_the_int4_grid_export_reads_back(case, act_order):
    weight, hessian, _ = case
    dequantized, amax = gptq_quantize(weight, hessian, group_size=GROUP, settings=GptqSettings(act_order=act_order))
    exported = quantize_int4(dequantized, GROUP, "float32", weight_amax=amax)
    torch.testing.assert_close(dequantize_int4(exported), dequantized, rtol=0, atol=1e-6)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_held_out_inputs(case, act_order):
    weight, hessian, heldout = case
    dequantized, _ = gptq_quantize(weight, hessian, group_size=GROUP, settings=GptqSettings(act_order=act_order))
    gptq_error, rtn_error = output_error(weight, dequantized, heldout), output_error(weight, rtn(weight), heldout)
    assert gptq_error < 0.6 * rtn_error, (gptq_error, rtn_error)


def test_group_scales_follow_the_compensated_weights(case):
    """Without act order each group's amax is taken from the weights GPTQ has moved, not the originals: none of the
    compensated weights is clipped, so some groups' amax differs from the original weights' group max."""
    weight, hessian, _ = case
    _, amax = gptq_quantize(weight, hessian, group_size=GROUP)
    original = weight.abs().reshape(96, -1, GROUP).amax(dim=-1)
    torch.testing.assert_close(amax[:, 0], original[:, 0])  # nothing has moved the first group yet
    assert (amax[:, 1:] - original[:, 1:]).abs().max() > 1e-3


def test_an_input_never_seen_is_zeroed_and_the_rest_still_quantized(case):
    weight, hessian, _ = case
    hessian = hessian.clone()
    hessian[5, :] = 0
    hessian[:, 5] = 0
    dequantized, _ = gptq_quantize(weight, hessian, group_size=GROUP)
    assert torch.all(dequantized[:, 5] == 0) and torch.isfinite(dequantized).all()


def test_stages_follow_the_order_a_decoder_layer_runs_its_linears():
    names = ["mlp.down_proj", "self_attn.o_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.q_proj", "lm_head"]
    assert sorted(names, key=stage_of) == ["self_attn.k_proj", "self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj",
                                           "mlp.down_proj", "lm_head"]


@pytest.mark.parametrize("settings, words", [
    (GptqSettings(damp=0.0), "--gptq-damp 0.0 must be a number in (0, 1]"),
    (GptqSettings(damp=1.5), "--gptq-damp 1.5 must be a number in (0, 1]"),
    (GptqSettings(damp=True), "--gptq-damp True must be"),
    (GptqSettings(block_size=48), "--gptq-block-size 48 must be a positive multiple of the group size 32"),
    (GptqSettings(block_size=0), "--gptq-block-size 0 must be"),
    (GptqSettings(act_order="yes"), "--gptq-act-order must be true or false"),
])
def test_out_of_range_settings_are_refused_in_one_sentence(settings, words):
    with pytest.raises(LlmxError) as err:
        settings.check(GROUP)
    message = str(err.value)
    assert words in message and message.count(". ") == 0 and message.endswith(".")


def test_gptq_beats_round_to_nearest_on_the_first_layers_of_smollm2():
    """The real model, cut to its first 3 decoder layers: calibrated on Pride and Prejudice, the layers' output on
    Emma moves less from the bf16 model's with GPTQ (layerwise, true sequential) than with round-to-nearest."""
    import copy

    import transformers

    from helpers.corpus import CORPUS
    from helpers.smollm2 import smollm2_dir
    from llmx.formats import presets
    from llmx.quant.calibrate import build_calibration_set, make_forward_loop
    from llmx.quant.modelopt import gptq_layerwise, quantize_model

    hf = smollm2_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf))
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.bfloat16,
                                                             num_hidden_layers=3).eval()
    calib = build_calibration_set(str(CORPUS / "austen_prideprejudice.txt"), tokenizer, calib_size=16, seq_len=128,
                                  batch_size=8, seed=0)
    heldout = torch.tensor([tokenizer.encode((CORPUS / "austen_emma.txt").read_text()[:20_000])[:512]])
    config = presets.modelopt_config("int4_wo", group_size=64, kv_cache_dtype=None, disabled_modules=["lm_head"])

    def hidden(model) -> torch.Tensor:
        with torch.no_grad():
            return model.model(input_ids=heldout).last_hidden_state.float()

    reference = hidden(bf16)
    rtn_model, gptq_model = copy.deepcopy(bf16), copy.deepcopy(bf16)
    quantize_model(rtn_model, config, None)
    loop = make_forward_loop(calib, use_cache=False)
    quantize_model(gptq_model, {**config, "algorithm": None}, loop)
    gptq_layerwise(gptq_model, loop, group_size=64, settings=GptqSettings())
    rtn_error = float((hidden(rtn_model) - reference).pow(2).mean())
    gptq_error = float((hidden(gptq_model) - reference).pow(2).mean())
    assert gptq_error < 0.7 * rtn_error, (gptq_error, rtn_error)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from llmx.ingest.convert import convert
    from helpers.tiny_models import make_outlier_llama

    workdir = tmp_path_factory.mktemp("quant-gptq")
    return convert(make_outlier_llama(workdir / "hf"), workdir / "ckpt")


@pytest.mark.parametrize("kwargs, words", [
    ({"algo": "int4_wo", "gptq_damp": 0.05}, "--gptq-damp sets GPTQ, and --algo int4_wo does not run GPTQ"),
    ({"algo": "int4_awq", "gptq_act_order": True}, "--gptq-act-order sets GPTQ, and --algo int4_awq does not"),
    ({"algo": "int4_gptq", "group_size": 32, "gptq_block_size": 48},
     "--gptq-block-size 48 must be a positive multiple of the group size 32"),
    ({"algo": "int4_gptq", "gptq_damp": 2.0}, "--gptq-damp 2.0 must be a number in (0, 1]"),
])
def test_quantize_refuses_gptq_options_that_do_not_apply(tiny_ckpt, tmp_path, kwargs, words):
    from llmx.quant.api import quantize

    with pytest.raises(LlmxError) as err:
        quantize(tiny_ckpt, tmp_path / "out", calib_data=str(tmp_path / "unused.txt"), **kwargs)
    assert words in str(err.value)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_gptq_flag_for_another_algorithm_in_one_line(tmp_path, capsys):
    from llmx.cli.main import run_cli

    assert run_cli(["quantize", str(tmp_path), "-o", str(tmp_path / "q"), "--algo", "int8_wo",
                    "--gptq-act-order"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --gptq-act-order sets GPTQ, and --algo int8_wo does not run GPTQ; drop --gptq-act-order "
                   "or use --algo int4_gptq."]
    assert not (tmp_path / "q").exists()


def test_recipe_gptq_fields_reach_quantize(tmp_path):
    from llmx.cli._settings import resolve_settings
    from llmx.cli.quantize import DEFAULTS

    recipe = tmp_path / "r.yaml"
    recipe.write_text("family: llama\ntarget: cpu\n"
                      "quantize: {algo: int4_gptq, gptq_damp: 0.05, gptq_act_order: true}\n")
    values = resolve_settings("quantize", recipe=str(recipe), flags={"gptq_damp": None}, defaults=DEFAULTS).values
    assert (values["gptq_damp"], values["gptq_act_order"], values["gptq_block_size"]) == (0.05, True, None)


def test_quantize_hands_its_gptq_settings_to_the_layerwise_pass(tiny_ckpt, tmp_path, monkeypatch):
    import llmx.quant.api as api
    from llmx.quant.api import quantize

    class Reached(Exception):
        pass

    seen = {}

    def capture(model, loop, *, group_size, settings):
        seen.update(group_size=group_size, settings=settings)
        raise Reached

    monkeypatch.setattr(api, "gptq_layerwise", capture)  # where quantize() calls it
    calib = tmp_path / "calib.txt"
    from helpers.corpus import CORPUS

    calib.write_text((CORPUS / "austen_emma.txt").read_text()[:20_000])
    with pytest.raises(Reached):
        quantize(tiny_ckpt, tmp_path / "out", algo="int4_gptq", calib_data=str(calib), calib_size=2, calib_seq_len=32,
                 group_size=32, gptq_damp=0.05, gptq_block_size=64, gptq_act_order=True)
    assert seen == {"group_size": 32, "settings": GptqSettings(damp=0.05, block_size=64, act_order=True)}
