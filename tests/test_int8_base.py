"""training.precision int8: the frozen base layers' matmuls in int8 while a LoRA run trains."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import metric_records
from test_fused_lora import _grads, _pair

from tunesmith.methods.int8_base import Int8Weight, quantize_rows, use_int8_base


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_quantize_rows_round_trips_within_half_a_step_and_keeps_zero_rows():
    torch.manual_seed(0)
    t = torch.randn(6, 40) * torch.tensor([1, 10, 0.01, 100, 1, 1]).view(-1, 1)
    t[4] = 0
    q, s = quantize_rows(t)
    assert q.dtype == torch.int8 and s.shape == (6, 1)
    assert int(q.abs().amax(-1)[:4].min()) == 127 and int(q[4].abs().max()) == 0  # each row uses the full range
    assert torch.all((q.float() * s - t).abs() <= s / 2 + 1e-7)
    out = torch.empty_like(q)
    q2, _ = quantize_rows(t, out)
    assert q2.data_ptr() == out.data_ptr() and torch.equal(q2, q)


def test_int8_matmuls_are_close_to_fp32_both_ways():
    torch.manual_seed(0)
    w, x, g = torch.randn(48, 64), torch.randn(37, 64), torch.randn(37, 48)
    q = Int8Weight(w)
    y = q.linear(x)
    assert y.dtype == torch.float32 and y.shape == (37, 48)
    assert _rel(y, x @ w.T) < 0.02
    gx = q.input_grad(g)
    assert gx.shape == (37, 64) and _rel(gx, g @ w) < 0.02
    # Not the same numbers as fp32 (it does quantize), and a row's scale follows the row.
    assert _rel(y, x @ w.T) > 1e-4
    assert _rel(q.linear(x * 1000), (x * 1000) @ w.T) < 0.02
    # No tokens (an expert no token was routed to): empty results, as fp32 gives.
    assert q.linear(x[:0]).shape == (0, 48) and q.input_grad(g[:0]).shape == (0, 64)


def _lora(dropout: float = 0.0):
    """test_fused_lora's fused model: two LoRA layers on fp32 Linear bases, B non-zero."""
    return _pair(dropout)[1]


def _step(model, x):
    """(output, input gradient, parameter gradients) of one fresh backward."""
    model.zero_grad(set_to_none=True)
    return _grads(model, x)


def test_the_fused_layer_trains_through_int8_base_matmuls_close_to_fp32():
    model = _lora().train()
    x = torch.randn(2, 21, 24)
    out, gx, grads = _step(model, x)
    assert use_int8_base(model) == 2
    out8, gx8, grads8 = _step(model, x)
    assert not torch.equal(out8, out)  # the int8 path ran
    assert _rel(out8, out) < 0.03 and _rel(gx8, gx) < 0.03
    assert grads8.keys() == grads.keys() and len(grads) == 4  # A and B of two layers
    for name in grads:
        assert _rel(grads8[name], grads[name]) < 0.05, name


def test_forwards_without_gradients_and_switched_off_layers_compute_in_fp32():
    model = _lora().train()
    x = torch.randn(3, 24)
    with torch.no_grad():
        ref = model(x)
    use_int8_base(model)
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # evaluation and generation see the model that is saved
    layer = model.base_model.model[0]
    assert layer._int8_weight.values.dtype == torch.int8
    assert use_int8_base(model, on=False) == 0 and layer._int8_weight is None
    out, _, _ = _step(model, x)
    with torch.no_grad():
        assert torch.equal(out, model(x))


def test_all_copies_share_one_block_and_dropout_still_applies():
    model = _lora(dropout=0.3).train()
    use_int8_base(model)
    a, b = (model.base_model.model[i]._int8_weight.values for i in (0, 2))
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    x = torch.randn(4, 24)
    torch.manual_seed(1)
    first = model(x)
    torch.manual_seed(2)
    assert not torch.equal(first, model(x))  # another mask
    torch.manual_seed(1)
    assert torch.equal(first, model(x))  # the same seed, the same mask


def test_an_int8_run_follows_the_fp32_run_and_saves_a_plain_adapter(run_config, tmp_path):
    import tunesmith

    curves, lines = {}, []
    for precision in ("fp32", "int8"):
        cfg = run_config(training={"epochs": 3, "precision": precision}, output={"dir": str(tmp_path / precision)})
        result = tunesmith.train(cfg, echo=lines.append)
        curves[precision] = [r["loss"] for r in metric_records(result.run_dir) if "loss" in r]
    assert any("precision int8 (14 frozen base layers as int8 matmuls" in line for line in lines), lines
    assert result.precision.startswith("int8")
    assert (result.artifact_dir / "adapter_config.json").is_file()
    fp32, int8 = curves["fp32"], curves["int8"]
    assert len(int8) == len(fp32) and int8[-1] < int8[0]
    assert fp32 != int8  # it did quantize
    assert max(abs(a - b) / b for a, b in zip(int8, fp32)) < 0.01, (int8, fp32)


@pytest.mark.parametrize("method, message", [
    ({"type": "dora"}, "int8 works with lora, rslora and lora_fa"),
    ({"type": "ia3"}, "method.type 'ia3' trains without that layer"),
])
def test_int8_refuses_methods_without_fused_lora_layers(run_config, method, message):
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(run_config(method=method, training={"precision": "int8"}))


def test_int8_refuses_a_non_fp32_model_dtype(run_config):
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError

    with pytest.raises(ConfigError, match="model.dtype bf16"):
        load_config(run_config(model={"dtype": "bf16"}, training={"precision": "int8"}))


def test_int8_on_gpt2s_conv1d_layers_fails_before_the_run_folder(run_config, tmp_path):
    import tunesmith
    from conftest import build_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    from tunesmith.errors import ConfigError

    folder = tmp_path / "gpt2"
    tok = build_tokenizer(folder)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128)).save_pretrained(folder)
    cfg = run_config(model={"name_or_path": str(folder)}, training={"precision": "int8"})
    with pytest.raises(ConfigError, match="int8 needs LoRA on plain torch Linear layers; .* put LoRA on Conv1D"):
        tunesmith.train(cfg, echo=lambda m: None)
    assert not Path(cfg["output"]["dir"]).exists()


@pytest.mark.parametrize("objective, compared", [("dpo", "a frozen reference's"), ("kto", "a frozen reference's"),
                                                 ("grpo", "the sampling policy's")])
def test_int8_refuses_objectives_that_compare_with_fp32_forwards(run_config, tmp_path, objective, compared):
    import tunesmith
    from conftest import QA, WRONG, write_jsonl
    from tunesmith.errors import ConfigError

    if objective == "grpo":
        rows = [{"prompt": q, "answer": a} for q, a in QA * 2]
        extra = {"rewards": [{"function": "correctness"}], "max_completion_length": 8}
    elif objective == "kto":
        rows = [{"prompt": q, "completion": a, "label": True} for q, a in QA] + [
            {"prompt": q, "completion": WRONG[a], "label": False} for q, a in QA]
        extra = {}
    else:
        rows = [{"prompt": q, "chosen": a, "rejected": WRONG[a]} for q, a in QA * 2]
        extra = {}
    cfg = run_config(data={"train": str(write_jsonl(tmp_path / "rows.jsonl", rows))},
                     objective={"type": objective, **extra}, training={"precision": "int8"})
    with pytest.raises(ConfigError, match=f"int8 with objective.type {objective}: .*{compared}"):
        tunesmith.train(cfg, echo=lambda m: None)
    assert not Path(cfg["output"]["dir"]).exists()


def test_a_run_that_fails_in_training_drops_the_int8_copies_and_scratch(run_config, monkeypatch):
    import tunesmith
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from tunesmith.methods import int8_base

    seen = []
    real = int8_base.use_int8_base
    monkeypatch.setattr(int8_base, "use_int8_base", lambda model, on=True: seen.append(model) or real(model, on))

    def fail(*_args):
        raise RuntimeError("simulated failure mid-training")

    handle = register_optimizer_step_post_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="simulated failure"):
            tunesmith.train(run_config(training={"precision": "int8"}), echo=lambda m: None)
    finally:
        handle.remove()
    layers = [m for m in seen[0].modules() if hasattr(m, "_int8_weight")]
    assert layers and all(m._int8_weight is None for m in layers)
    assert "buffers" not in int8_base._SCRATCH.__dict__
