"""The fused LoRA layer against peft's own forward: same outputs, same gradients, same artifacts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tunesmith.methods.fused_lora import FusedLoraLinear, drop_mask


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
    drop, kept = drop_mask(x.shape, 0.3, x.device)
    keep = ~drop
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
def test_drop_mask_rate_and_exact_keep_probability(p):
    torch.manual_seed(0)
    drop, kept = drop_mask(torch.Size([400, 500]), p, torch.device("cpu"))
    assert drop.dtype == torch.bool and drop.shape == (400, 500)
    assert abs(kept - (1 - p)) <= 0.5 / 65536
    assert abs(1 - drop.float().mean().item() - kept) < 0.005  # 200k draws: sd ~0.0007
    # Every lane of the 64-bit words is used: each quarter of the flat mask has the same rate.
    lanes = drop.flatten()[: 200000].view(-1, 4).float().mean(0)
    assert torch.all((1 - lanes - kept).abs() < 0.01)


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
