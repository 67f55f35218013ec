"""`llmx pipeline --model ORG/NAME` and `model.source: ORG/NAME[@REVISION]`: the hub model is resolved through
huggingface_hub's cache (offline here) at planning time, and convert records its repository and commit."""

from __future__ import annotations

import json

import pytest

from helpers.hub_cache import add_to_hub_cache
from llmx.cli.pipeline import stage_defaults
from llmx.common.errors import LlmxError
from llmx.pipeline.plan import make_plan


def test_model_flag_and_model_source_take_hub_ids(project, offline_cache):
    main = add_to_hub_cache(offline_cache, "org/tiny", project.model)
    tagged = add_to_hub_cache(offline_cache, "org/tiny", project.model, commit="1" * 40, revisions=("v1",))
    plan = make_plan(str(project.recipe()), defaults=stage_defaults(), model="org/tiny", workdir=project.workdir)
    assert plan.model == main and not plan.model_is_checkpoint
    plan = make_plan(str(project.recipe(model={"source": "org/tiny@v1"})), defaults=stage_defaults())
    assert plan.model == tagged


def test_a_hub_model_that_is_not_cached_offline_is_one_sentence(project, offline_cache):
    with pytest.raises(LlmxError) as info:
        make_plan(str(project.recipe(model={"source": "org/absent"})), defaults=stage_defaults())
    assert "org/absent" in info.value.message and "HF_HUB_OFFLINE" in info.value.message


def test_convert_stage_records_the_hub_commit(project, offline_cache):
    snapshot = add_to_hub_cache(offline_cache, "org/tiny", project.model)
    code, summary, err = project.run(project.recipe(), "--only", "convert", model="org/tiny")
    assert code == 0, err
    provenance = json.loads((project.workdir / "convert" / "llmx.json").read_text())["provenance"]
    assert provenance["hub"] == {"repo_id": "org/tiny", "revision": None, "commit": snapshot.name}
