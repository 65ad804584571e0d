"""A fused LoRA linear layer: base matmul, dropout, A, B and the scaled add in one autograd node.

peft's LoRA forward runs `result + lora_B(lora_A(dropout(x))) * scaling` as separate ops. On
a CPU that costs more than the low-rank matmuls themselves (profile in docs/benchmarks.md):
`nn.Dropout` draws one Bernoulli sample per element from a single-threaded generator (~30 % of
a SmolLM2 LoRA step at dropout 0.05), x is cast to the fp32 adapter dtype and back to bf16
by autocast, and the scale and the add each pass over the whole output.

Here the dropout mask comes from full-range 64-bit random words split into four 16-bit lanes
(one generator call per four elements, so the mask is ~6x cheaper to draw; the drop rate is
exact to 1/65536 and the kept values are rescaled by that exact keep probability, so the layer
stays unbiased; the rescale is folded into A); dropped elements are zeroed with masked_fill,
so no mask is ever cast to the activations' dtype; the scale is folded into B (an r x out
matrix), and the LoRA product is added into the base output in place with one addmm. No mask
exists when dropout is 0.

The layer is peft's own `lora.Linear` (same parameters, names and state dict), registered
through peft's custom-module API, so adapters save and load with plain peft. Anything outside
the plain case (merged weights, several adapters, DoRA, mixed-batch adapter names, a base
weight that learns) takes peft's forward unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from ..hardware import matmul_dtype

_LANES = 4  # int16 lanes in one int64 word
_LANE_VALUES = 1 << 16
_INT64_MIN = -(1 << 63)


def drop_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """(boolean mask of `shape`, True where dropped; exact keep probability) for dropout rate `p`."""
    n = math.prod(shape)
    # random_(min, None) draws all 64 bits (plain random_() leaves the sign bit 0).
    words = torch.empty(-(-n // _LANES), dtype=torch.int64, device=device).random_(_INT64_MIN, None)
    lanes = words.view(torch.int16)[:n].view(shape)  # each uniform over [-32768, 32767]
    cut = round(p * _LANE_VALUES)
    return lanes < cut - _LANE_VALUES // 2, 1.0 - cut / _LANE_VALUES


class _LoraLinear(torch.autograd.Function):
    """y = x W^T + b + s * dropout(x) A^T B^T, with the base weight frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, p: float, dtype: torch.dtype):
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)
            w = weight.to(dtype)
            a = lora_a.to(dtype)
            bs = (lora_b * scaling).to(dtype)
            out = F.linear(xc, w, None if bias is None else bias.to(dtype))
            drop, inv = None, 1.0
            if p > 0:
                drop, kept = drop_mask(xc.shape, p, xc.device)
                inv = 1.0 / kept
                # The 1 / keep-probability rescale rides on A (r x in) instead of on x (tokens x in).
                a = a * inv
                xd = xc.masked_fill(drop, 0)
            else:
                xd = xc
            flat_x = xd.reshape(-1, xd.shape[-1])
            h = flat_x @ a.t()
            out.view(-1, out.shape[-1]).addmm_(h, bs.t())
        ctx.save_for_backward(flat_x, drop, h, w, a, bs)
        ctx.inv, ctx.scaling, ctx.bias_grad = inv, scaling, bias is not None and bias.requires_grad
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype, None if bias is None else bias.dtype)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        flat_x, drop, h, w, a, bs = ctx.saved_tensors
        a_dtype, b_dtype, bias_dtype = ctx.param_dtypes
        g = grad.reshape(-1, grad.shape[-1]).to(w.dtype)
        gh = g @ bs  # (tokens, r)
        grad_x = None
        if ctx.needs_input_grad[0]:
            gxd = gh @ a  # a carries the dropout rescale
            if drop is not None:
                gxd = gxd.view(drop.shape).masked_fill_(drop, 0).view_as(gxd)
            grad_x = torch.addmm(gxd, g, w).view(*grad.shape[:-1], w.shape[1]).to(ctx.x_dtype)
        grad_a = None
        if ctx.needs_input_grad[3]:
            grad_a = gh.t() @ flat_x
            grad_a = (grad_a.mul_(ctx.inv) if drop is not None else grad_a).to(a_dtype)
        grad_b = (g.t() @ h).mul_(ctx.scaling).to(b_dtype) if ctx.needs_input_grad[4] else None
        grad_bias = g.sum(0).to(bias_dtype) if ctx.bias_grad else None
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None


class FusedLoraLinear(PeftLoraLinear):
    """peft's LoRA Linear with a fused forward/backward for the plain single-adapter case."""

    def _fused_adapter(self, args: tuple, kwargs: dict) -> str | None:
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        base = self.get_base_layer()
        if (name not in self.lora_A or name in self.lora_variant or type(base) is not nn.Linear
                or base.weight.requires_grad):
            return None
        return name

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fused_adapter(args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        return _LoraLinear.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                                 float(self.scaling[name]), p, matmul_dtype(x, base.weight))
