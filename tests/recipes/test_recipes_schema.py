"""Recipes: every shipped one validates, and every kind of mistake is refused naming the file and the key."""

from __future__ import annotations

import textwrap

import pytest

from llmx.common.errors import LlmxError
from llmx.recipes import find_recipe, load_recipe, shipped_recipes
from llmx.recipes.schema import FAMILIES, SECTIONS, TARGETS, Recipe, target_conflict


def write(tmp_path, text: str, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_every_family_and_target_ships_a_recipe():
    assert shipped_recipes() == sorted(f"{f}/{t}" for f in FAMILIES for t in TARGETS)


@pytest.mark.parametrize("name", shipped_recipes())
def test_shipped_recipe_validates_and_matches_its_path(name):
    recipe, display = load_recipe(name)
    family, target = name.split("/")
    assert (recipe.family, recipe.target) == (family, target)
    assert display == f"recipes/{name}.yaml"
    assert recipe.build.device == TARGETS[target].device
    if TARGETS[target].compute_capability == (8, 0):
        assert recipe.quantize.algo not in ("fp8", "fp8_pc_pt", "w4a8_awq", "nvfp4")
        assert recipe.quantize.kv_cache_dtype != "fp8"


def test_recipe_file_path_is_accepted_and_sections_hold_only_given_keys(tmp_path):
    path = write(tmp_path, """
        family: qwen2
        target: h100
        build: {tp: 2, max_batch_size: 128}
        quantize: {algo: awq, exclude: [lm_head]}
    """)
    recipe, display = load_recipe(str(path))
    assert display == str(path)
    assert recipe.section("build") == {"tp": 2, "max_batch_size": 128}
    assert recipe.section("quantize") == {"algo": "int4_awq", "exclude": ["lm_head"]}  # alias resolved
    assert recipe.section("run") == {}


def test_unknown_nested_key_names_key_file_and_allowed_keys(tmp_path):
    path = write(tmp_path, """
        family: llama
        target: h100
        build: {max_batch: 8}
    """, name="h100.yaml")
    with pytest.raises(LlmxError) as info:
        load_recipe(path)
    message = info.value.message
    assert message.startswith(f"{path}: unknown key `build.max_batch`; allowed: tp, pp, max_batch_size,")
    assert "\n" not in message


def test_unknown_top_level_key_lists_sections(tmp_path):
    path = write(tmp_path, "family: llama\ntarget: cpu\nbuidl: {tp: 1}\n")
    with pytest.raises(LlmxError, match=r"unknown key `buidl`; allowed: family, target, description, model, convert"):
        load_recipe(path)


def test_unknown_shipped_name_lists_the_shipped_recipes():
    with pytest.raises(LlmxError, match=r"recipe llama/h900 not found: .*llama/h100"):
        find_recipe("llama/h900")


@pytest.mark.parametrize("body, fragment", [
    ("build: {tp: '2'}", "`build.tp`: Input should be a valid integer"),
    ("build: {tp: 0}", "`build.tp`: Input should be greater than 0"),
    ("run: {top_p: 1.5}", "`run.top_p`: Input should be less than or equal to 1"),
    ("convert: {dtype: float8}", "`convert.dtype`: Input should be"),
    ("run: {chat: 1}", "`run.chat`: Input should be a valid boolean"),
    ("run: {presence_penalty: 3}", "`run.presence_penalty`: Input should be less than or equal to 2"),
    ("run: {logprobs: 21}", "`run.logprobs`: Input should be less than or equal to 20"),
    ("run: {n: 0}", "`run.n`: Input should be greater than 0"),
])
def test_bad_values_are_refused_naming_the_field(tmp_path, body, fragment):
    path = write(tmp_path, f"family: llama\ntarget: cpu\n{body}\n")
    with pytest.raises(LlmxError) as info:
        load_recipe(path)
    assert info.value.message.startswith(f"{path}: ")
    assert fragment in info.value.message


def test_missing_family_is_required(tmp_path):
    path = write(tmp_path, "target: cpu\n")
    with pytest.raises(LlmxError, match=r"`family` is required"):
        load_recipe(path)


@pytest.mark.parametrize("body, field", [
    ("quantize: {algo: fp8}", "quantize.algo"),
    ("quantize: {algo: nvfp4}", "quantize.algo"),
    ("quantize: {algo: w4a8}", "quantize.algo"),  # an alias of w4a8_awq, resolved before the check
    ("quantize: {algo: int4_awq, kv_cache_dtype: fp8}", "quantize.kv_cache_dtype"),
])
def test_fp8_formats_on_a100_are_refused_naming_the_field(tmp_path, body, field):
    path = write(tmp_path, f"family: llama\ntarget: a100\n{body}\n")
    with pytest.raises(LlmxError) as info:
        load_recipe(path)
    assert f"{path}: `{field}`" in info.value.message
    assert "compute capability 8.9+" in info.value.message and "a100 is 8.0" in info.value.message


def test_fp8_on_hopper_and_int4_on_a100_are_accepted(tmp_path):
    load_recipe(write(tmp_path, "family: llama\ntarget: h200\nquantize: {algo: nvfp4, kv_cache_dtype: fp8}\n", "a.yaml"))
    load_recipe(write(tmp_path, "family: llama\ntarget: a100\nquantize: {algo: int4_gptq, kv_cache_dtype: int8}\n", "b.yaml"))


def test_engine_device_must_match_the_target(tmp_path):
    path = write(tmp_path, "family: mistral\ntarget: h100\nbuild: {device: cpu}\n")
    with pytest.raises(LlmxError, match=r"`build.device` cpu: target h100 runs engines on cuda, not cpu"):
        load_recipe(path)


def test_unknown_algorithm_is_refused(tmp_path):
    path = write(tmp_path, "family: llama\ntarget: h100\nquantize: {algo: int3_magic}\n")
    with pytest.raises(LlmxError, match=r"`quantize.algo` int3_magic is not a known algorithm; use one of fp8,"):
        load_recipe(path)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "family: llama\ntarget: cpu\nbuild: {tp: 1\n")
    with pytest.raises(LlmxError, match=rf"{path}: not valid YAML at line \d+"):
        load_recipe(path)


def test_recipe_must_be_a_mapping(tmp_path):
    with pytest.raises(LlmxError, match="a recipe must be a YAML mapping"):
        load_recipe(write(tmp_path, "- llama\n- cpu\n"))


def test_target_conflict_is_none_for_compatible_settings():
    assert target_conflict("h100", "quantize", "algo", "fp8") is None
    assert target_conflict("cpu", "build", "device", "cpu") is None
    assert target_conflict("a100", "build", "device", "auto") is None
    assert target_conflict("a100", "quantize", "algo", "fp8")


def test_sections_cover_the_recipe_model():
    stage_fields = set(Recipe.model_fields) - {"family", "target", "description"}
    assert stage_fields == set(SECTIONS) | {"model"}
