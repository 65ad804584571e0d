"""build_optimizer: parameter groups and, on CUDA, the fused AdamW kernel."""

from __future__ import annotations

import torch
from torch import nn

from tunesmith.config import TrainingConfig
from tunesmith.engine.optim import build_optimizer


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    model[0].weight.requires_grad_(False)
    return model


def test_cuda_runs_get_the_fused_adamw_with_the_same_update():
    cfg = TrainingConfig(learning_rate=1e-2, weight_decay=0.1)
    x = torch.randn(4, 8)
    after = []
    for device_type in ("cpu", "cuda"):  # the CPU build of torch runs fused AdamW's CPU kernel
        model = _model()
        opt = build_optimizer(model, cfg, device_type)
        assert bool(opt.defaults.get("fused")) == (device_type == "cuda")
        # Frozen weights stay out; the norm and biases are not decayed.
        assert sum(len(g["params"]) for g in opt.param_groups) == 5
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
        for _ in range(3):
            model(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
        after.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*after):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(after[0][1], _model()[0].bias)  # it trained
