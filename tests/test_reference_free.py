"""ORPO and SimPO in the one loop: the definitions TRL uses, learning, refusals, and parity with TRL.

The parity tests follow test_dpo_trl_parity.py's recipe against trl.experimental's ORPOTrainer
and CPOTrainer(loss_type="simpo"), with one change: the chat template ends the assistant turn
with the EOS token. Those two trainers still tokenize the old way (render to text, then
`add_eos_token_if_needed`), which appends an EOS after the fallback template's "<|im_end|>\\n", so
with that template TRL trains on one token more per answer than DPO, KTO or tunesmith do
(test_trl_legacy_tokenization_adds_an_eos_after_the_fallback_template pins that difference down).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import QA, WRONG, metric_records, training_steps, window_mean, write_jsonl
from parity_recipe import TRL_ARGS, run_tunesmith, save_tiny_llama

PAIRS = [(q, a, WRONG[a]) for q, a in QA * 3][:16]
# The fallback template without the newline after an answer's <|im_end|> (the EOS token).
EOS_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\n<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture
def pairs_file(tmp_path):
    rows = [{"prompt": q, "chosen": a, "rejected": WRONG[a]} for q, a in QA * 4]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


def pref_config(run_config, pairs_file, objective: str, **options):
    return run_config(data={"train": str(pairs_file), "shuffle": False},
                      objective={"type": objective, **options},
                      training={"batch_size": 4, "learning_rate": 1e-2, "max_grad_norm": None,
                                "scheduler": "constant", "max_steps": 6})


# --------------------------------------------------------------------------- definitions


def test_pair_scores_are_trls_averaged_logps_and_orpo_nll(tiny_model_dir, tiny_tokenizer):
    """Against TRL's own formulas on full logits: get_batch_logps(average_log_prob=True), and ORPO's chosen
    NLL = CrossEntropyLoss over every real token of the chosen rows (prompt included)."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from tunesmith.data.preference import collate_pairs, encode_pair
    from tunesmith.objectives.reference_free import pair_scores

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    recs = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for q, c, r in PAIRS[:3]]
    rows = [encode_pair(tiny_tokenizer, r, max_length=64) for r in recs]
    batch = collate_pairs(rows, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        sums, counts, nll = pair_scores(model, batch, whole_chosen=True)
        sums2, counts2, none = pair_scores(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(2, labels.clamp(min=0)[..., None])[..., 0]
    mask = labels != -100
    want_avg = (logp * mask).sum(-1) / mask.sum(-1)
    assert torch.allclose(sums / counts, want_avg, atol=1e-5)
    assert torch.equal(sums, sums2) and torch.equal(counts, counts2) and none is None
    n = len(rows)
    full = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)[:n, 1:]
    want_nll = F.cross_entropy(logits[:n, :-1].reshape(-1, logits.shape[-1]), full.reshape(-1))
    assert float(nll) == pytest.approx(float(want_nll), abs=1e-5)
    # ... which is not the completion-only NLL: the prompt tokens are part of it.
    assert float(nll) != pytest.approx(float(-sums[:n].sum() / counts[:n].sum()), abs=1e-3)


def test_orpo_loss_is_nll_minus_beta_times_log_odds_ratio(run_config, pairs_file):
    cfg = pref_config(run_config, pairs_file, "orpo", beta=0.25)
    _, steps = training_steps(cfg)
    for r in steps:  # equal batches, one micro-batch per step: the logged means recompose the loss
        assert r["loss"] == pytest.approx(r["nll_loss"] - 0.25 * r["log_odds_ratio"], rel=1e-5)
        assert r["log_odds_ratio"] <= 0
        assert r["rewards/chosen"] == pytest.approx(0.25 * r["logps/chosen"], rel=1e-5)  # β·ℓ, ℓ averaged


@pytest.mark.parametrize("options", [{}, {"gamma": 1.0, "label_smoothing": 0.1, "sft_weight": 0.5}])
def test_simpo_loss_of_one_pair_is_the_shifted_logistic_loss_of_its_margin(run_config, pairs_file, options):
    cfg = pref_config(run_config, pairs_file, "simpo", **options)
    cfg["training"]["batch_size"] = 1  # one pair per step: the logged margin is that pair's β(ℓc − ℓr)
    _, steps = training_steps(cfg)
    gamma, ls, w = options.get("gamma", 0.5), options.get("label_smoothing", 0.0), options.get("sft_weight", 0.0)
    for r in steps:
        x = torch.tensor(r["rewards/margins"] - gamma, dtype=torch.float64)
        want = -(1 - ls) * torch.nn.functional.logsigmoid(x) - ls * torch.nn.functional.logsigmoid(-x)
        assert r["loss"] == pytest.approx(float(want) + w * r.get("nll_loss", 0.0), rel=1e-5)
        assert ("nll_loss" in r) == bool(w)
    if not options:
        assert steps[0]["loss"] > math.log(2)  # γ > 0 pushes the loss above ln 2 at equal rewards


# --------------------------------------------------------------------------- learning


def test_orpo_learns_the_preference(run_config, pairs_file):
    cfg = pref_config(run_config, pairs_file, "orpo", beta=1.0)
    cfg["training"]["max_steps"] = 24
    _, steps = training_steps(cfg)
    first, last = steps[:6], steps[-6:]
    assert window_mean(last, "loss") < window_mean(first, "loss") - 0.3
    assert window_mean(last, "nll_loss") < window_mean(first, "nll_loss")
    assert window_mean(last, "log_odds_chosen") > window_mean(first, "log_odds_chosen") + 0.2
    assert window_mean(last, "rewards/accuracies") > 0.8


def test_simpo_learns_the_preference(run_config, pairs_file):
    cfg = pref_config(run_config, pairs_file, "simpo", beta=2.0, gamma=1.0)  # the SimPO paper's range
    cfg["training"]["max_steps"] = 24
    _, steps = training_steps(cfg)
    first, last = steps[:6], steps[-6:]
    assert window_mean(last, "loss") < window_mean(first, "loss") - 0.1
    assert window_mean(last, "rewards/margins") > window_mean(first, "rewards/margins") + 0.5
    assert window_mean(last, "rewards/accuracies") > 0.8
    assert window_mean(last, "logps/rejected") < window_mean(first, "logps/rejected")


def test_eval_reports_reward_accuracy_and_margins(run_config, pairs_file):
    import tunesmith

    for objective in ("orpo", "simpo"):
        cfg = pref_config(run_config, pairs_file, objective)
        cfg["data"]["split"] = {"validation_file": str(pairs_file)}
        cfg["output"]["dir"] += objective
        result = tunesmith.train(cfg, echo=lambda m: None)
        for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen"):
            assert key in result.metrics, (objective, key)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("objective", ["orpo", "simpo"])
def test_unpaired_or_sft_data_is_refused_naming_the_format(run_config, alpaca_file, tmp_path, objective):
    import tunesmith
    from tunesmith.errors import DataError

    unpaired = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": q, "completion": a, "label": True} for q, a in QA])
    for data in (alpaca_file, unpaired):
        cfg = run_config(data={"train": str(data)}, objective={"type": objective})
        with pytest.raises(DataError, match=r"formats preference"):
            tunesmith.train(cfg, echo=lambda m: None)


def test_left_truncation_is_refused(run_config, pairs_file):
    import tunesmith
    from tunesmith.errors import ConfigError

    cfg = pref_config(run_config, pairs_file, "orpo")
    cfg["data"]["truncation"] = "left"
    with pytest.raises(ConfigError, match="data.truncation"):
        tunesmith.train(cfg, echo=lambda m: None)


# --------------------------------------------------------------------------- parity with TRL


def _saved(folder, template: str):
    folder.mkdir(parents=True, exist_ok=True)
    save_tiny_llama(folder, template=template)
    rows = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for q, c, r in PAIRS]
    return folder, write_jsonl(folder / "pairs.jsonl", rows), rows


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return _saved(tmp_path_factory.mktemp("orpo-parity"), EOS_TEMPLATE)


def trl_trainer(kind: str, folder, rows, out, **options):
    from datasets import Dataset
    from transformers import AutoTokenizer

    if kind == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer
    else:
        from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Trainer
    args = Config(output_dir=str(out), **TRL_ARGS, **options)
    return Trainer(model=str(folder), args=args, train_dataset=Dataset.from_list(rows),
                   processing_class=AutoTokenizer.from_pretrained(folder))


def our_rows(folder, data):
    from transformers import AutoTokenizer

    from tunesmith.config import DataConfig
    from tunesmith.objectives import ORPO

    tok = AutoTokenizer.from_pretrained(folder)
    cfg = DataConfig(train=str(data), max_length=64)
    recs = [json.loads(l) for l in data.read_text().splitlines()]
    return [ORPO().encode(tok, r, cfg, None)[0] for r in recs], tok


def assert_steps_match(theirs, ours, keys):
    assert len(theirs) == len(ours) == 6
    for step, (t, o) in enumerate(zip(theirs, ours), 1):
        assert o["loss"] == pytest.approx(t["loss"], abs=1e-5), f"step {step} loss"
        for key in keys:
            assert o[key] == pytest.approx(t[key], abs=1e-5), f"step {step} {key}"
        assert o["grad_norm"] == pytest.approx(t["grad_norm"], rel=1e-4), f"step {step} grad_norm"


LOGGED = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
          "logps/rejected"]


def test_trl_legacy_tokenization_adds_an_eos_after_the_fallback_template(tmp_path):
    pytest.importorskip("trl", reason="TRL (the `bench` extra) is the reference implementation")
    from tunesmith.data.templates import FALLBACK_CHAT_TEMPLATE

    for template, extra in ((FALLBACK_CHAT_TEMPLATE, 1), (EOS_TEMPLATE, 0)):
        folder, data, rows = _saved(tmp_path / str(extra), template)
        theirs = trl_trainer("orpo", folder, rows, tmp_path / f"out{extra}").train_dataset
        ours, tok = our_rows(folder, data)
        for t, o in zip(theirs, ours):
            for key in ("chosen", "rejected"):
                assert t[f"{key}_input_ids"] == o["prompt_ids"] + o[f"{key}_ids"] + [tok.eos_token_id] * extra


def test_orpo_matches_trl_step_by_step(saved, tmp_path):
    pytest.importorskip("trl", reason="TRL (the `bench` extra) is the reference implementation")
    folder, data, rows = saved
    trainer = trl_trainer("orpo", folder, rows, tmp_path / "trl", beta=0.1)
    ours_rows, _ = our_rows(folder, data)
    assert trainer.train_dataset["chosen_input_ids"] == [r["prompt_ids"] + r["chosen_ids"] for r in ours_rows]
    trainer.train()
    theirs = [h for h in trainer.state.log_history if "loss" in h and "nll_loss" in h]
    ours = run_tunesmith(folder, data, tmp_path / "ours", {"type": "orpo", "beta": 0.1})
    assert_steps_match(theirs, ours, LOGGED + ["nll_loss", "log_odds_ratio", "log_odds_chosen"])


@pytest.mark.parametrize("options", [{"gamma": 0.5}, {"gamma": 1.0, "label_smoothing": 0.1, "sft_weight": 0.5}])
def test_simpo_matches_trl_cpo_simpo_step_by_step(saved, tmp_path, options):
    pytest.importorskip("trl", reason="TRL (the `bench` extra) is the reference implementation")
    folder, data, rows = saved
    trainer = trl_trainer("cpo", folder, rows, tmp_path / "trl", loss_type="simpo", beta=0.1,
                          simpo_gamma=options["gamma"], label_smoothing=options.get("label_smoothing", 0.0),
                          cpo_alpha=options.get("sft_weight", 0.0))
    trainer.train()
    theirs = [h for h in trainer.state.log_history if "loss" in h and "rewards/margins" in h]
    ours = run_tunesmith(folder, data, tmp_path / "ours", {"type": "simpo", "beta": 0.1, **options})
    assert_steps_match(theirs, ours, LOGGED + (["nll_loss"] if options.get("sft_weight") else []))
