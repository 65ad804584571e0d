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


def test_learned_scales_are_not_decayed(tiny_model_dir):
    """IA3's vectors and DoRA's magnitudes are stored as matrices or vectors of scales that start at 1:
    weight decay would pull them toward 0. LoRA's A and B matrices decay."""
    from peft import IA3Config, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = TrainingConfig(learning_rate=1e-2, weight_decay=0.1)
    for peft_cfg, scale in ((IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                       feedforward_modules=["down_proj"]), "ia3_l"),
                            (LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "lora_magnitude_vector")):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), peft_cfg)
        names = {id(p): n for n, p in model.named_parameters()}
        decayed = {names[id(p)] for g in build_optimizer(model, cfg).param_groups if g["weight_decay"] for p in g["params"]}
        scales = {n for n, p in model.named_parameters() if scale in n}
        assert scales and not scales & decayed
        assert all("lora_A" in n or "lora_B" in n for n in decayed)
