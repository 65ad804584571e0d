"""The method x objective matrix: every supported cell trains and reloads; every other cell is refused.

Each supported cell trains a tiny in-process model of the family the objective is for, on
data the training step sees whole (one batch), checks the loss went down, then reloads the
saved artifact with `load_trained` and recomputes the final eval loss: it must equal the
one the run reported, which proves the artifact holds everything that learned.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import QA, SENTENCES, WRONG, build_tokenizer, method_keys, write_jsonl
from tunesmith.config import load_config
from tunesmith.errors import ConfigError
from tunesmith.methods.matrix import matrix, supported_cells

NER = [
    (["paris", "is", "the", "capital", "of", "france"], ["B-LOC", "O", "O", "O", "O", "B-LOC"]),
    (["the", "sky", "is", "blue"], ["O", "O", "O", "O"]),
    (["he", "said", "paris", "and", "france"], ["O", "O", "B-LOC", "O", "B-LOC"]),
    (["water", "in", "france", "is", "blue"], ["O", "O", "B-LOC", "O", "O"]),
]


def _data(objective: str, folder: Path) -> Path:
    path = folder / f"{objective}.jsonl"
    if objective == "sft":
        rows = [{"instruction": q, "input": "", "output": a} for q, a in QA]
    elif objective in ("causal_lm", "masked_lm"):
        rows = [{"text": f"{q} {a}"} for q, a in QA] + [{"text": s} for s, _ in SENTENCES]
    elif objective == "seq2seq":
        rows = [{"prompt": q, "completion": a} for q, a in QA]
    elif objective == "classification":
        rows = [{"text": s, "label": y} for s, y in SENTENCES]
    elif objective == "token_classification":
        rows = [{"tokens": t, "tags": y} for t, y in NER]
    elif objective in ("dpo", "orpo", "simpo", "reward"):
        rows = [{"prompt": q, "chosen": a, "rejected": WRONG[a]} for q, a in QA]
    elif objective == "kto":
        rows = [{"prompt": q, "completion": c, "label": good} for q, a in QA for c, good in ((a, True), (WRONG[a], False))]
    elif objective == "distill":  # the student's task is sft
        rows = [{"instruction": q, "input": "", "output": a} for q, a in QA]
    elif objective in ("grpo", "rloo", "ppo"):
        rows = [{"prompt": q, "answer": a} for q, a in QA]
    else:  # a new objective needs its fixture here
        raise AssertionError(f"no matrix data for objective {objective}")
    return write_jsonl(path, rows)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir, tiny_bert_dir, tiny_bert_wide_dir, tiny_t5_dir) -> dict[str, Path]:
    """One tiny model per family, plus a decoder and a seq2seq model with bias terms for BitFit."""
    from transformers import BartConfig, BartForConditionalGeneration

    biased = tmp_path_factory.mktemp("tiny-llama-bias")
    tok = build_tokenizer(biased)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=3,
        eos_token_id=2, bos_token_id=None, attention_bias=True, mlp_bias=True,
    )).save_pretrained(biased)

    bart = tmp_path_factory.mktemp("tiny-bart")
    from transformers import AutoTokenizer

    t5_tok = AutoTokenizer.from_pretrained(tiny_t5_dir)
    t5_tok.save_pretrained(bart)
    torch.manual_seed(0)
    BartForConditionalGeneration(BartConfig(
        vocab_size=len(t5_tok), d_model=48, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=128,
        pad_token_id=0, eos_token_id=1, bos_token_id=1, decoder_start_token_id=1, forced_eos_token_id=None,
    )).save_pretrained(bart)
    return {"llama": tiny_model_dir, "bert": tiny_bert_dir, "bert-wide": tiny_bert_wide_dir, "t5": tiny_t5_dir,
            "llama-bias": biased, "bart": bart}


# Classification heads (and BERT's pooler) start fresh; the wide BERT lets them learn in 8 steps.
FAMILY = {"sft": "llama", "causal_lm": "llama", "masked_lm": "bert-wide", "seq2seq": "t5", "classification": "bert-wide",
          "token_classification": "bert-wide", "dpo": "llama", "orpo": "llama", "simpo": "llama", "kto": "llama",
          "reward": "llama", "distill": "llama", "grpo": "llama", "rloo": "llama", "ppo": "llama"}
# BitFit needs bias terms, which the tiny Llama and T5 (like the real ones) do not have.
BIAS_FAMILY = {"llama": "llama-bias", "t5": "bart"}

METHOD_OPTIONS = {
    "freeze": {"train_last_n_layers": 1},
    "prefix_tuning": {"num_virtual_tokens": 4},
    "prompt_tuning": {"num_virtual_tokens": 4},
    "p_tuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 32},
    "adapter": {"reduction_factor": 4},
    "linear_probe": {"probe_head": "linear"},
}
OBJECTIVE_OPTIONS = {"masked_lm": {"mlm_probability": 0.3},
                     **{o: {"rewards": [{"function": "rl_rewards:even"}], "num_generations": 2,
                            "max_completion_length": 6} for o in ("grpo", "rloo", "ppo")}}
# Online cells generate every step and check no loss curve (tests/test_grpo.py shows learning): 3 steps.
STEPS = {"grpo": 3, "rloo": 3, "ppo": 3}
LEARNING_RATE = {"full": 3e-3, "freeze": 3e-3, "bitfit": 3e-2, "prompt_tuning": 1e-1, "p_tuning": 3e-2,
                 "prefix_tuning": 3e-2, "ia3": 5e-2, "linear_probe": 3e-2}
# At 1e-1 a soft prompt over a fresh classifier head overshoots (classification 0.96 -> 2.26 -> 1.16 ...) and,
# while the tiny BERT still differed per session, failed the cell once; at 3e-2 it descends (0.96 -> 0.26).
CELL_LEARNING_RATE = {("prompt_tuning", "classification"): 3e-2, ("prompt_tuning", "token_classification"): 3e-2}


def _cell_config(method: str, objective: str, models: dict, folder: Path) -> dict:
    family = FAMILY[objective]
    if method == "bitfit":
        family = BIAS_FAMILY.get(family, family)
    data = _data(objective, folder)
    return {
        "model": {"name_or_path": str(models[family])},
        "data": {"train": str(data), "max_length": 48, "shuffle": False,
                 "split": {"validation_file": str(data)}},
        "method": method_keys({"type": method, "r": 4, "alpha": 8, "dropout": 0.0, **METHOD_OPTIONS.get(method, {})}),
        "objective": {"type": objective, **OBJECTIVE_OPTIONS.get(objective, {}),
                      **({"teacher": str(models["llama"])} if objective == "distill" else {})},
        "training": {"max_steps": STEPS.get(objective, 8), "batch_size": 64,
                     "learning_rate": CELL_LEARNING_RATE.get((method, objective), LEARNING_RATE.get(method, 1e-2)),
                     "scheduler": "constant", "progress": False, "log_every": 1, "precision": "fp32",
                     "max_grad_norm": None},
        "eval": {"forgetting": False},
        "output": {"dir": str(folder / "run")},
    }


@pytest.mark.parametrize("method,objective", supported_cells())
def test_supported_cell_trains_and_reloads(method, objective, models, tmp_path):
    import tunesmith
    from tunesmith.artifacts import load_trained
    from tunesmith.data.pipeline import build_data
    from tunesmith.engine import evaluate_loss
    from tunesmith.objectives import OBJECTIVES

    if method == "qlora":
        pytest.importorskip("bitsandbytes", reason="qlora needs the bitsandbytes extra")
    cfg = load_config(_cell_config(method, objective, models, tmp_path))
    result = tunesmith.train(cfg, echo=lambda m: None)

    steps = [r for r in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(steps) == cfg.training.max_steps
    # A policy-gradient loss does not fall as the policy learns, and 8 steps of a sampled reward are noise
    # for most methods (tests/test_grpo.py shows learning); here the reloaded policy must differ from the base.
    if not OBJECTIVES[objective].online:
        losses = [r["loss"] for r in steps]
        assert min(losses[-3:]) < losses[0], f"{method} x {objective}: loss did not decrease: {losses}"

    loaded = load_trained(result.run_dir)
    assert loaded.manifest["method"] == method and loaded.manifest["objective"] == objective
    if OBJECTIVES[objective].online:  # evaluation generates: the reloaded policy writes the same completions
        from functools import partial

        from tunesmith.generation import generate_ids
        from tunesmith.objectives import StepContext, build_objective

        ctx = StepContext(loaded.model, loaded.tokenizer, generate=partial(generate_ids, loaded.model,
                                                                          loaded.tokenizer))
        online = build_objective(cfg.objective)
        data = build_data(cfg.data, loaded.tokenizer, seed=cfg.training.seed, packing=False, objective=online,
                          objective_cfg=cfg.objective)
        again = online.evaluate(ctx, data.val, 64)
        for key in ("eval_reward", "eval_completions/mean_length"):
            assert again[key] == pytest.approx(result.metrics[key], rel=1e-6), key
        base = load_trained(cfg.model.name_or_path).model
        ids = online.collator(loaded.tokenizer, cfg.objective, data.task, train=False)(data.val[:4])
        with torch.no_grad():
            moved = (loaded.model(**ids).logits[:, -1] - base(**ids).logits[:, -1]).abs().max().item()
        assert moved > 1e-4, f"{method} x {objective}: the trained policy equals the base"
        return
    objective_impl = OBJECTIVES[objective]()
    data = build_data(cfg.data, loaded.tokenizer, seed=cfg.training.seed, packing=cfg.packing_enabled,
                      objective=objective_impl, objective_cfg=cfg.objective)
    collate = objective_impl.collator(loaded.tokenizer, cfg.objective, data.task, train=False)

    cpu = SimpleNamespace(device=torch.device("cpu"), autocast=nullcontext)  # what evaluate_loss uses
    ctx = None
    if objective_impl.needs_reference:  # the reloaded policy is scored against the untrained base
        from tunesmith.engine.loop import reference_policy
        from tunesmith.methods import METHODS
        from tunesmith.objectives import StepContext

        scope = METHODS[method].reference_scope(loaded.model)
        if scope is None:
            base = load_trained(cfg.model.name_or_path).model
            scope = reference_policy(base, None)
        ctx = StepContext(loaded.model, loaded.tokenizer, reference=scope)
    again = evaluate_loss(loaded.model, objective_impl, data.val, collate, 64, cpu, ctx)
    assert again["eval_loss"] == pytest.approx(result.metrics["eval_loss"], rel=1e-5, abs=1e-6)


UNSUPPORTED = [(m, o, why) for m, row in matrix().items() for o, why in row.items() if why is not None]


@pytest.mark.parametrize("method,objective,why", UNSUPPORTED)
def test_unsupported_cell_is_refused_at_validation(method, objective, why, tmp_path):
    cfg = {
        "model": {"name_or_path": "any/model"},
        "data": {"train": "any.jsonl"},
        "method": {"type": method},
        "objective": {"type": objective, **({"teacher": "any/teacher"} if objective == "distill" else {})},
    }
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert f"method.type '{method}' cannot train objective.type '{objective}'" in str(err.value)
    assert why in str(err.value)


def test_matrix_covers_every_registered_pair():
    from tunesmith.methods import METHODS
    from tunesmith.objectives import OBJECTIVES

    grid = matrix()
    assert set(grid) == set(METHODS)
    assert all(set(row) == set(OBJECTIVES) for row in grid.values())
    # The foundation cells can never silently drop out of the matrix.
    for cell in [("lora", "sft"), ("full", "classification"), ("lora", "seq2seq"), ("full", "masked_lm")]:
        assert cell in supported_cells()


def test_methods_command_prints_the_matrix():
    from typer.testing import CliRunner

    from tunesmith.cli import app

    out = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "200"})
    assert out.exit_code == 0
    for m in matrix():
        assert m in out.output
    for why in {w for _, _, w in UNSUPPORTED}:
        assert why[:40] in out.output.replace("\n", " ")
