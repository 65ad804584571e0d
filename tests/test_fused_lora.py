"""The fused LoRA layer against peft's own forward: same outputs, same gradients, same artifacts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tunesmith.methods.fused_lora import FusedLoraLinear, _zero_dropped, drop_positions


def _pair(dropout: float, seed: int = 0):
    """(plain peft model, fused peft model) with identical weights and a non-zero B."""
    from peft import LoraConfig, get_peft_model

    models = []
    for fused in (False, True):
        torch.manual_seed(seed)
        base = nn.Sequential(nn.Linear(24, 32), nn.GELU(), nn.Linear(32, 16, bias=False))
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0", "2"])
        if fused:
            config._register_custom_module({nn.Linear: FusedLoraLinear})
        model = get_peft_model(base, config)
        torch.manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(p, std=0.5)  # B starts at zero; make the LoRA branch count
        models.append(model)
    assert isinstance(models[1].base_model.model[0], FusedLoraLinear)
    assert not isinstance(models[0].base_model.model[0], FusedLoraLinear)
    return models


def _grads(model, x):
    x = x.clone().requires_grad_()
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), x.grad, grads


def test_no_dropout_matches_peft_exactly_in_fp32():
    plain, fused = _pair(dropout=0.0)
    x = torch.randn(3, 5, 24)
    out_p, gx_p, g_p = _grads(plain.train(), x)
    out_f, gx_f, g_f = _grads(fused.train(), x)
    torch.testing.assert_close(out_f, out_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_f, gx_p, rtol=1e-5, atol=1e-6)
    assert g_f.keys() == g_p.keys() and len(g_f) == 4
    for name in g_p:
        torch.testing.assert_close(g_f[name], g_p[name], rtol=1e-5, atol=1e-6)


def test_dropout_matches_the_same_mask_applied_by_hand():
    """With dropout, the fused layer equals base + s * B A (x * keep / p_keep) for the mask it drew."""
    _, fused = _pair(dropout=0.3)
    layer = fused.base_model.model[2]
    x = torch.randn(6, 32, requires_grad=True)
    torch.manual_seed(7)
    out = layer(x)
    (out * 0.5).sum().backward()
    torch.manual_seed(7)
    keep = torch.ones(x.numel(), dtype=torch.bool)
    keep[drop_positions(x.numel(), 0.3)] = False
    keep, kept = keep.view(x.shape), 0.7
    a = layer.lora_A["default"].weight.detach().clone().requires_grad_()
    b = layer.lora_B["default"].weight.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    ref = xr @ layer.base_layer.weight.T + layer.scaling["default"] * ((xr * keep / kept) @ a.T) @ b.T
    (ref * 0.5).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A["default"].weight.grad, a.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B["default"].weight.grad, b.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drop_positions_are_independent_bernoulli_draws(p):
    n = 200_000
    torch.manual_seed(0)
    pos = drop_positions(n, p)
    assert pos.dtype == torch.int64 and int(pos[0]) >= 0 and int(pos[-1]) < n
    assert torch.all(pos[1:] > pos[:-1])  # sorted, no repeats
    dropped = torch.zeros(n, dtype=torch.bool)
    dropped[pos] = True
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(dropped.float().mean().item() - p) < 5 * sd
    # Independence: neighbours are both dropped at rate p^2, and every quarter has rate p.
    both = (dropped[1:] & dropped[:-1]).float().mean().item()
    assert abs(both - p * p) < 5 * (p * p * (1 - p * p) / n) ** 0.5
    assert torch.all((dropped.view(4, -1).float().mean(1) - p).abs() < 10 * sd)
    # Gaps between drops are Geometric(p): P(gap = 1) = p, P(gap > 10) = (1 - p)^10.
    gaps = (pos[1:] - pos[:-1]).float()
    assert abs((gaps == 1).float().mean().item() - p) < 0.01
    assert abs((gaps > 10).float().mean().item() - (1 - p) ** 10) < 0.01
    # torch's seed decides the draw (seeded runs and resumed checkpoints repeat it).
    torch.manual_seed(0)
    assert torch.equal(drop_positions(n, p), pos)
    assert not torch.equal(drop_positions(n, p)[:100], pos[:100])


def test_drop_positions_tiny_and_total_rates():
    torch.manual_seed(0)
    assert torch.equal(drop_positions(7, 1.0), torch.arange(7))
    counts = torch.zeros(3)
    for _ in range(2000):  # n smaller than the gap draw's margin: the loop must cut at n
        counts[drop_positions(3, 0.5)] += 1
    assert torch.all((counts / 2000 - 0.5).abs() < 0.05)


def test_a_mask_and_its_positions_zero_the_same_elements():
    """Accelerators draw a bool mask, CPUs flat positions; both must zero the same gradient entries."""
    torch.manual_seed(0)
    t = torch.randn(6, 10)
    mask = torch.rand(6, 10) < 0.3
    by_mask = _zero_dropped(t.clone(), mask)
    by_positions = _zero_dropped(t.clone(), mask.flatten().nonzero().flatten())
    torch.testing.assert_close(by_mask, by_positions, rtol=0, atol=0)
    torch.testing.assert_close(by_mask, t * ~mask, rtol=0, atol=0)


def test_backward_keeps_the_input_not_a_dropped_copy():
    """Activation memory: layers reading one input (q, k and v) keep that one tensor for backward, and the
    dropped positions as int32, however many layers draw their own dropout."""
    _, fused = _pair(dropout=0.1)
    first = fused.base_model.model[0].train()
    x = torch.randn(4, 7, 24, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        outs = [first(x), first(x)]  # two draws over the same input, as q and k do
    wide = [t for t in saved if t.numel() == x.numel()]
    assert len(wide) == 2 and all(t.data_ptr() == x.data_ptr() for t in wide)
    positions = [t for t in saved if t.dim() == 1 and not t.is_floating_point()]
    assert len(positions) == 2 and all(t.dtype == torch.int32 for t in positions)
    sum(o.sum() for o in outs).backward()  # and backward still runs from what was kept
    assert x.grad is not None and first.lora_A["default"].weight.grad.abs().sum() > 0


def test_dropout_one_leaves_only_the_base_output():
    _, fused = _pair(dropout=1.0)
    layer = fused.base_model.model[2].train()
    x = torch.randn(5, 32, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out, layer.base_layer(x))
    out.sum().backward()
    assert torch.count_nonzero(layer.lora_A["default"].weight.grad) == 0


def test_dropout_is_unbiased_in_expectation():
    _, fused = _pair(dropout=0.2)
    layer = fused.base_model.model[0].train()
    x = torch.randn(1, 24).expand(20000, 24)
    with torch.no_grad():
        mean = layer(x).mean(0)
        layer.eval()
        clean = layer(x[:1])[0]
    torch.testing.assert_close(mean, clean, rtol=0, atol=0.05)


def test_bf16_autocast_close_to_peft():
    plain, fused = _pair(dropout=0.0)
    x = torch.randn(4, 7, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_p, gx_p, g_p = _grads(plain, x)
        out_f, gx_f, g_f = _grads(fused, x)
    assert out_f.dtype == torch.bfloat16
    torch.testing.assert_close(out_f.float(), out_p.float(), rtol=3e-2, atol=3e-2)
    for name in g_p:
        assert g_f[name].dtype == torch.float32  # adapter weights and their grads stay fp32
        torch.testing.assert_close(g_f[name], g_p[name], rtol=5e-2, atol=5e-2)


def test_disabled_adapter_and_eval_take_the_base_path(tmp_path):
    from peft import PeftModel

    plain, fused = _pair(dropout=0.1)
    x = torch.randn(2, 24)
    fused.eval()
    with fused.disable_adapter():
        torch.testing.assert_close(fused(x), fused.base_model.model[2](torch.nn.functional.gelu(
            fused.base_model.model[0].base_layer(x))))
    # Saved by the fused layer, loaded by plain peft: the same function.
    fused.save_pretrained(tmp_path)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 32), nn.GELU(), nn.Linear(32, 16, bias=False))
    reloaded = PeftModel.from_pretrained(base, tmp_path).eval()
    assert not isinstance(reloaded.base_model.model[0], FusedLoraLinear)
    torch.testing.assert_close(reloaded(x), fused(x))


def test_merged_for_inference_computes_the_unmerged_function_and_only_without_gradients():
    from tunesmith.methods.fused_lora import merged_for_inference

    _, fused = _pair(dropout=0.1)
    fused.eval()
    x = torch.randn(3, 24)
    expected = fused(x)
    layer = fused.base_model.model[0]
    with merged_for_inference(fused):
        with torch.no_grad():
            merged = fused(x)
        assert layer._merged_weight is not None  # the gradient-free forward ran on the merged copy
        kept = layer._merged_weight
        torch.testing.assert_close(kept, layer.base_layer.weight + layer.scaling["default"]
                                   * layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
        with_grad = fused(x)
        assert with_grad.requires_grad and layer._merged_weight is kept  # a forward with gradients is unmerged
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            low = fused(x)
        assert low.dtype == torch.bfloat16 and layer._merged_weight.dtype == torch.bfloat16
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(with_grad.detach(), expected)
    torch.testing.assert_close(low.float(), expected, rtol=3e-2, atol=3e-2)
    assert layer._merged_weight is None and not layer._merge_for_inference  # dropped on exit
