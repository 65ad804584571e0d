"""Every training recipe under examples/ is a valid config (validated as `tunesmith train` would)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tunesmith.config import load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RECIPES = sorted(p for p in EXAMPLES.rglob("*.yaml")
                 if (keys := set(yaml.safe_load(p.read_text()) or {})) >= {"model"} and keys & {"data", "tasks"})


def test_there_are_recipes_for_alignment():
    names = {p.relative_to(EXAMPLES).as_posix() for p in RECIPES}
    for want in ("alignment/dpo_lora.yaml", "alignment/reward_lora.yaml", "alignment/kto_lora.yaml",
                 "alignment/orpo_lora.yaml", "alignment/simpo_lora.yaml", "distill/sst2_minilm_student.yaml",
                 "distill/smollm2_half_layers.yaml", "distill/sst2_minilm_transfer_set.yaml",
                 "rl/grpo_arithmetic_lora.yaml", "rl/grpo_dapo_lora.yaml", "rl/grpo_gsm8k_lora.yaml", "rl/rloo_arithmetic_lora.yaml",
                 "rl/arithmetic_reward_lora.yaml", "rl/ppo_arithmetic_lora.yaml"):
        assert want in names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.relative_to(EXAMPLES).as_posix())
def test_recipe_validates(recipe):
    cfg = load_config(recipe)
    assert cfg.objective.type and cfg.method.type


MERGE_RECIPES = sorted((EXAMPLES / "merge").glob("*.yaml"))


def test_there_is_a_merge_recipe_for_every_method():
    from tunesmith.merging.registry import MERGE_METHODS

    methods = set()
    for recipe in MERGE_RECIPES:
        data = yaml.safe_load(recipe.read_text())
        methods.add(data.get("method", "linear"))
        methods.update(c["method"] for c in (data.get("search") or {}).get("candidates", []))
        methods.update((data.get("search") or {}).get("grid", {}).get("method", []))
    assert set(MERGE_METHODS) - {"breadcrumbs_ties"} <= methods


@pytest.mark.parametrize("recipe", MERGE_RECIPES, ids=lambda p: p.name)
def test_merge_recipe_validates(recipe):
    from tunesmith.merging.spec import load_merge_spec

    spec = load_merge_spec(recipe)
    assert spec.candidates()


DEPLOY_SCRIPTS = sorted((EXAMPLES / "deploy").glob("*.sh"))


def test_deploy_scripts_cover_each_command():
    text = " ".join(p.read_text() for p in DEPLOY_SCRIPTS)
    for command in ("tunesmith export", "--format gguf", "--format merged", "--format bnb-4bit", "tunesmith serve",
                    "tunesmith chat", "tunesmith push"):
        assert command in text


@pytest.mark.parametrize("script", DEPLOY_SCRIPTS, ids=lambda p: p.name)
def test_deploy_script_uses_only_options_the_cli_has(script):
    """Every `tunesmith CMD --option` in the script is an option CMD's --help lists."""
    import re

    from typer.testing import CliRunner

    from tunesmith.cli import app

    body = script.read_text().replace("\\\n", " ")
    calls = re.findall(r"^\s*(?:test .*\|\| )?tunesmith (\w[\w-]*)([^\n&|]*)", body, flags=re.M)
    assert calls, f"{script.name} runs no tunesmith command"
    for command, args in calls:
        helped = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
        assert helped.exit_code == 0, f"{script.name}: unknown command {command}"
        for option in re.findall(r"(--[\w-]+)", args):
            assert option in helped.output, f"{script.name}: tunesmith {command} has no {option}"
