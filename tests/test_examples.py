"""Every training recipe under examples/ is a valid config (validated as `tunesmith train` would)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tunesmith.config import load_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RECIPES = sorted(p for p in EXAMPLES.rglob("*.yaml") if {"model", "data"} <= set(yaml.safe_load(p.read_text()) or {}))


def test_there_are_recipes_for_alignment():
    names = {p.relative_to(EXAMPLES).as_posix() for p in RECIPES}
    for want in ("alignment/dpo_lora.yaml", "alignment/reward_lora.yaml", "alignment/kto_lora.yaml",
                 "alignment/orpo_lora.yaml", "alignment/simpo_lora.yaml", "distill/sst2_minilm_student.yaml",
                 "distill/smollm2_half_layers.yaml", "distill/sst2_minilm_transfer_set.yaml",
                 "rl/grpo_arithmetic_lora.yaml", "rl/grpo_gsm8k_lora.yaml", "rl/rloo_arithmetic_lora.yaml",
                 "rl/arithmetic_reward_lora.yaml", "rl/ppo_arithmetic_lora.yaml"):
        assert want in names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.relative_to(EXAMPLES).as_posix())
def test_recipe_validates(recipe):
    cfg = load_config(recipe)
    assert cfg.objective.type and cfg.method.type
