"""precision: auto times real training steps of a proxy model and keeps the fastest, per machine and shape."""

from __future__ import annotations

import time

import pytest
import torch

from tunesmith import precision
from tunesmith.methods import METHODS


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "device_type", lambda: "cpu")


@pytest.fixture
def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=2)


def fake_proxy(costs: dict, calls: list):
    """A proxy whose step costs depend on the weight dtype and on autocast."""

    def build(weights):
        def step():
            autocast = torch.is_autocast_enabled("cpu")
            key = "bf16-weights" if weights == torch.bfloat16 else ("bf16" if autocast else "fp32")
            calls.append(key)
            time.sleep(costs[key])
        return step

    return build


@pytest.mark.parametrize("fastest", ["fp32", "bf16", "bf16-weights"])
def test_auto_picks_the_fastest_timed_step_and_caches_it(llama_config, fastest):
    costs = {"fp32": 0.03, "bf16": 0.03, "bf16-weights": 0.03, fastest: 0.005}
    calls = []
    choice = precision.choose("auto", model_config=llama_config, method=METHODS["lora"],
                              build_proxy=fake_proxy(costs, calls), tokens=64)
    want = {"fp32": ("fp32", "fp32"), "bf16": ("bf16", "fp32"), "bf16-weights": ("bf16", "bf16")}[fastest]
    assert (choice.precision, choice.weights) == want
    assert set(calls) == {"fp32", "bf16", "bf16-weights"} and choice.how == "measured now"
    assert min(choice.timings, key=choice.timings.get) == fastest
    calls.clear()
    again = precision.choose("auto", model_config=llama_config, method=METHODS["lora"],
                             build_proxy=fake_proxy(costs, calls), tokens=64)
    assert not calls and (again.precision, again.weights) == want and "cached" in again.how


def test_candidates_are_timed_in_interleaved_rounds(llama_config):
    """A slow spell of the machine must not land on one candidate only."""
    calls = []
    precision.choose("auto", model_config=llama_config, method=METHODS["lora"],
                     build_proxy=fake_proxy({"fp32": 0.01, "bf16": 0.01, "bf16-weights": 0.01}, calls), tokens=64)
    names = list(precision.CANDIDATES)
    assert len(calls) >= 4 * len(names)  # a warm-up and at least three timed rounds
    assert calls == names * (len(calls) // len(names))


@pytest.mark.parametrize("timings, want", [
    ({"fp32": 1.0, "bf16": 0.50, "bf16-weights": 0.52}, "bf16-weights"),  # within 5 %: the leaner
    ({"fp32": 1.0, "bf16": 0.50, "bf16-weights": 0.60}, "bf16"),  # clearly slower: the fastest
    ({"fp32": 0.40, "bf16": 0.50}, "fp32"),  # a method that trains the base has no bf16-weights
])
def test_bf16_weights_win_ties_within_the_noise_margin(timings, want):
    assert precision._pick(timings) == want


def test_methods_that_train_the_base_never_get_bf16_weights(llama_config):
    calls = []
    choice = precision.choose("auto", model_config=llama_config, method=METHODS["full"],
                              build_proxy=fake_proxy({"fp32": 0.02, "bf16": 0.005, "bf16-weights": 0.0}, calls))
    assert (choice.precision, choice.weights) == ("bf16", "fp32")
    assert "bf16-weights" not in calls


def test_cache_key_separates_shapes_and_methods(llama_config):
    from transformers import LlamaConfig

    costs = {"fp32": 0.0, "bf16": 0.01, "bf16-weights": 0.01}
    calls = []
    precision.choose("auto", model_config=llama_config, method=METHODS["lora"], build_proxy=fake_proxy(costs, calls))
    n = len(calls)
    wider = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_attention_heads=4)
    precision.choose("auto", model_config=wider, method=METHODS["lora"], build_proxy=fake_proxy(costs, calls))
    precision.choose("auto", model_config=llama_config, method=METHODS["full"], build_proxy=fake_proxy(costs, calls))
    assert len(calls) > 2 * n  # both measured afresh


def test_a_kernel_isa_cap_is_measured_apart_from_the_uncapped_machine(llama_config, monkeypatch):
    """ONEDNN_MAX_CPU_ISA / MKL_ENABLE_INSTRUCTIONS (and ATEN_CPU_CAPABILITY, through the ISA torch
    reports) change kernel speeds: a capped run must not reuse the uncapped machine's choice."""
    costs = {"fp32": 0.0, "bf16": 0.01, "bf16-weights": 0.01}
    calls = []

    def choose():
        n = len(calls)
        precision.choose("auto", model_config=llama_config, method=METHODS["lora"], build_proxy=fake_proxy(costs, calls))
        return len(calls) > n  # measured afresh

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
    assert choose() and not choose()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert choose() and not choose()
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    assert choose()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert choose()
    assert "kernels=DEFAULT" in precision._cpu_identity()


def test_explicit_precision_is_kept_without_measuring(llama_config):
    calls = []
    choice = precision.choose("fp32", model_config=llama_config, method=METHODS["lora"],
                              build_proxy=fake_proxy({}, calls))
    assert (choice.precision, choice.weights, calls) == ("fp32", "fp32", [])
    assert precision.choose("bf16", method=METHODS["lora"]).weights == "bf16"
    assert precision.choose("bf16", method=METHODS["full"]).weights == "fp32"


def test_a_proxy_that_fails_falls_back_and_says_why(llama_config):
    said = []

    def broken(weights):
        raise RuntimeError("no proxy for this head")

    choice = precision.choose("auto", model_config=llama_config, method=METHODS["lora"], build_proxy=broken,
                              echo=said.append)
    assert choice.precision in ("bf16", "fp32") and "matmul" in choice.how
    assert "no proxy for this head" in said[0]


def test_proxy_config_keeps_widths_and_cuts_depth(llama_config):
    proxy = precision.proxy_config(llama_config)
    assert proxy.num_hidden_layers == precision.PROXY_LAYERS and llama_config.num_hidden_layers == 6
    assert (proxy.hidden_size, proxy.vocab_size, proxy.num_key_value_heads) == (32, 64, 2)


@pytest.mark.parametrize("method", [{"type": "lora", "r": 4, "alpha": 8, "dropout": 0.1}, {"type": "full"}])
def test_a_real_run_with_auto_times_its_proxy_and_reports_the_choice(run_config, method):
    import tunesmith

    said = []
    cfg = run_config(training={"precision": "auto", "max_steps": 2}, method=method)
    result = tunesmith.train(cfg, echo=said.append)
    line = next(m for m in said if m.startswith("precision auto:"))
    assert "fp32" in line and "bf16" in line and "measured now" in line
    assert result.precision.split(",")[0] in ("bf16", "fp32") and "weights" in result.precision
    if method["type"] == "full":
        assert "float32 weights" in result.precision  # weights that learn stay fp32
    # The second run of the same shape reads the cache.
    cfg["output"]["overwrite"] = True
    said.clear()
    tunesmith.train(cfg, echo=said.append)
    assert any("cached" in m for m in said if m.startswith("precision auto:"))


def test_proxy_times_the_longest_training_row_that_fits(run_config, tiny_tokenizer, monkeypatch):
    from tunesmith.api import _proxy_batch
    from tunesmith.config import load_config
    from tunesmith.data.pipeline import build_data
    from tunesmith.data.templates import IGNORE
    from tunesmith.objectives import OBJECTIVES

    cfg = load_config(run_config(data={"packing": True}))
    objective = OBJECTIVES["sft"]()
    data = build_data(cfg.data, tiny_tokenizer, seed=0, packing=True, objective=objective)
    batch = _proxy_batch(cfg, objective, tiny_tokenizer, data)
    longest = max(len(r["input_ids"]) for r in data.train)
    assert batch["input_ids"].shape == (1, longest)
    # A real packed SFT row: several examples (position ids restart) and unlabelled prompts.
    assert int((batch["position_ids"][0] == 0).sum()) > 1
    assert 0 < int((batch["labels"] != IGNORE).sum()) < longest
    # Rows longer than the proxy's length: random tokens instead (None).
    monkeypatch.setattr(precision, "PROXY_MAX_TOKENS", 4)
    assert _proxy_batch(cfg, objective, tiny_tokenizer, data) is None


def test_auto_times_a_classification_proxy_with_its_own_loss(tiny_bert_dir, tmp_path):
    import json

    import tunesmith

    data = tmp_path / "cls.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in
                              [("good film", "pos"), ("bad film", "neg"), ("great plot", "pos"), ("dull plot", "neg")] * 4))
    said = []
    tunesmith.train({"model": {"name_or_path": str(tiny_bert_dir)}, "data": {"train": str(data), "max_length": 16},
                     "objective": {"type": "classification"}, "method": {"type": "lora", "r": 2, "alpha": 4},
                     "training": {"max_steps": 1, "batch_size": 4, "precision": "auto", "progress": False},
                     "eval": {"forgetting": False, "at_end": False}, "output": {"dir": str(tmp_path / "run")}},
                    echo=said.append)
    line = next(m for m in said if m.startswith("precision auto:"))
    assert "measured now" in line and "could not time" not in line, said
