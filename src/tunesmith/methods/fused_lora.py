"""A fused LoRA linear layer: base matmul, dropout, A, B and the scaled add in one autograd node.

peft's LoRA forward runs `result + lora_B(lora_A(dropout(x))) * scaling` as separate ops. On
a CPU that costs more than the low-rank matmuls themselves (profile in docs/benchmarks.md):
`nn.Dropout` draws one Bernoulli sample per element from a single-threaded generator (~30 % of
a SmolLM2 LoRA step at dropout 0.05), x is cast to the fp32 adapter dtype and back to bf16
by autocast, and the scale and the add each pass over the whole output.

On a CPU the dropout mask is never drawn element by element: the gaps between dropped elements
of independent Bernoulli(p) draws are i.i.d. geometric, so `drop_positions` draws only the ~n·p
gaps (by inversion, from numpy's SFC64 seeded by one draw of torch's generator) and returns the
dropped elements' flat indices; x is copied and those elements zeroed with one index_fill, and
the same indices zero the input gradient in backward. Backward keeps x and the indices (int32), not
the copy, and rebuilds it for A's gradient: q, k and v read one x, so a layer keeps one tensor
where it kept three dropped copies. That is exact dropout at rate p; at
p = 0.05 it halved what dropout costs a bf16 step of SmolLM2 (docs/benchmarks.md). On an accelerator the
generator is on-device and a dense mask is cheap, so a boolean mask is drawn there. The kept
values' 1 / (1 - p) rescale is folded into A (an r x in matrix), the LoRA scale into B (r x out),
and the LoRA product is added into the base output in place with one addmm. No mask exists
when dropout is 0.

The layer is peft's own `lora.Linear` (same parameters, names and state dict), registered
through peft's custom-module API, so adapters save and load with plain peft. Anything outside
the plain case (merged weights, several adapters, DoRA, mixed-batch adapter names, a base
weight that learns) takes peft's forward unchanged.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from ..hardware import matmul_dtype
from .int8_base import Int8Weight

_INT64_MIN = -(1 << 63)  # random_(min, None) draws all 64 bits

_BITS = threading.local()


def _generator() -> np.random.Generator:
    """numpy's SFC64 seeded from three words of torch's default generator.

    Seeded the way SFC64's author prescribes (the state words, counter 1, 12 outputs discarded),
    which is also what numpy does after hashing a seed; setting the state of a kept bit generator
    costs ~1 us where building one from a seed costs ~6 us and more with cold caches mid-step.
    """
    bits = getattr(_BITS, "sfc64", None)
    if bits is None:
        bits = _BITS.sfc64 = np.random.SFC64(0)
        _BITS.generator = np.random.Generator(bits)
    words = torch.empty(3, dtype=torch.int64).random_(_INT64_MIN, None).numpy().view(np.uint64)
    bits.state = {"bit_generator": "SFC64", "state": {"state": np.append(words, np.uint64(1))},
                  "has_uint32": 0, "uinteger": 0}
    bits.random_raw(12)
    return _BITS.generator


def drop_positions(n: int, p: float) -> torch.Tensor:
    """Sorted flat indices (int64) of the elements that dropout at rate p drops among n.

    Each element is dropped independently with probability p: successive gaps are drawn as
    G = 1 + floor(log V / log(1 - p)), V uniform on (0, 1], which is Geometric(p). The bits come
    from numpy's SFC64 seeded by torch's default generator, so `torch.manual_seed` and the RNG
    state that checkpoints save decide every mask.
    """
    if p >= 1:
        return torch.arange(n)
    rng = _generator()
    scale = 1.0 / math.log1p(-p)
    # Enough gaps to pass n with overwhelming probability; the loop covers the rare shortfall.
    k = int(n * p + 6 * math.sqrt(n * p) + 16)
    parts, start = [], 0
    while True:
        gaps = rng.random(k)
        np.negative(gaps, out=gaps)
        np.log1p(gaps, out=gaps)  # log V, V = 1 - U on (0, 1]
        gaps *= scale
        np.floor(gaps, out=gaps)
        gaps += 1
        ends = torch.from_numpy(gaps).to(torch.int64).cumsum_(0).add_(start - 1)
        if int(ends[-1]) >= n:
            parts.append(ends[: int(torch.searchsorted(ends, n))])
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        parts.append(ends)
        start = int(ends[-1]) + 1


def _draw_drop(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x with the dropped elements zeroed, contiguous; what was dropped: flat indices on CPU, a mask elsewhere)."""
    if x.device.type == "cpu":
        drop = drop_positions(x.numel(), p)
        dropped = x.clone(memory_format=torch.contiguous_format)
        dropped.view(-1).index_fill_(0, drop, 0)
        return dropped, drop
    drop = torch.rand(x.shape, device=x.device) < p
    return x.masked_fill(drop, 0), drop


def _zero_dropped(t: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Zero, in place, the elements of contiguous `t` that `_draw_drop` dropped."""
    if drop.dtype == torch.bool:
        return t.view(drop.shape).masked_fill_(drop, 0).view_as(t)
    t.view(-1).index_fill_(0, drop, 0)
    return t


def _compact(drop: torch.Tensor | None, numel: int) -> torch.Tensor | None:
    """What backward keeps of the dropped positions: int32 indices where they fit (half of int64's memory)."""
    if drop is not None and drop.dtype == torch.int64 and numel < 2**31:
        return drop.to(torch.int32)
    return drop


class _LoraLinear(torch.autograd.Function):
    """y = x W^T + b + s * dropout(x) A^T B^T, with the base weight frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, p: float, dtype: torch.dtype,
                base_q: Int8Weight | None = None):
        with torch.autocast(x.device.type, enabled=False):
            xc = x.to(dtype)
            w = weight.to(dtype)
            a = lora_a.to(dtype)
            bs = (lora_b * scaling).to(dtype)
            if base_q is None:
                out = F.linear(xc, w, None if bias is None else bias.to(dtype))
            else:  # training.precision int8 (methods/int8_base.py): fp32 in and out
                out = base_q.linear(xc.reshape(-1, xc.shape[-1])).view(*xc.shape[:-1], base_q.values.shape[0])
                if bias is not None:
                    out += bias.to(dtype)
            drop, inv = None, 1.0
            if p > 0:
                xd, drop = _draw_drop(xc, p)
                inv = 1.0 / (1.0 - p) if p < 1 else 0.0
                # The 1 / keep-probability rescale rides on A (r x in) instead of on x (tokens x in).
                a = a * inv
            else:
                xd = xc
            h = xd.reshape(-1, xd.shape[-1]) @ a.t()
            out.view(-1, out.shape[-1]).addmm_(h, bs.t())
        # Backward keeps x, not its dropped copy: x is usually the same tensor for q, k and v (or gate and
        # up) and rebuilding the copy costs one memcpy and one index_fill, where keeping a copy per layer
        # costs (tokens x in) per LoRA module of a step's activation memory.
        ctx.save_for_backward(xc, _compact(drop, xc.numel()), h, w, a, bs)
        ctx.base_q = base_q
        ctx.inv, ctx.scaling, ctx.bias_grad = inv, scaling, bias is not None and bias.requires_grad
        ctx.param_dtypes = (lora_a.dtype, lora_b.dtype, None if bias is None else bias.dtype)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        xc, drop, h, w, a, bs = ctx.saved_tensors
        if drop is not None and drop.dtype == torch.int32:
            drop = drop.long()  # index_fill_ takes int64; widened once for both uses below
        a_dtype, b_dtype, bias_dtype = ctx.param_dtypes
        g = grad.reshape(-1, grad.shape[-1]).to(w.dtype)
        gh = g @ bs  # (tokens, r)
        grad_x = None
        if ctx.needs_input_grad[0]:
            gxd = gh @ a  # a carries the dropout rescale
            if drop is not None:
                gxd = _zero_dropped(gxd, drop)
            grad_x = torch.addmm(gxd, g, w) if ctx.base_q is None else gxd.add_(ctx.base_q.input_grad(g))
            grad_x = grad_x.view(*grad.shape[:-1], w.shape[1]).to(ctx.x_dtype)
        grad_a = None
        if ctx.needs_input_grad[3]:
            flat_x = xc.reshape(-1, xc.shape[-1])
            if drop is not None:
                flat_x = _zero_dropped(flat_x.clone(memory_format=torch.contiguous_format), drop)
            grad_a = gh.t() @ flat_x
            grad_a = (grad_a.mul_(ctx.inv) if drop is not None else grad_a).to(a_dtype)
        grad_b = (g.t() @ h).mul_(ctx.scaling).to(b_dtype) if ctx.needs_input_grad[4] else None
        grad_bias = g.sum(0).to(bias_dtype) if ctx.bias_grad else None
        return grad_x, None, grad_bias, grad_a, grad_b, None, None, None, None


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
        if getattr(self, "_merge_for_inference", False) and not torch.is_grad_enabled():
            return self._merged_forward(x, name, base)
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        dtype = matmul_dtype(x, base.weight)
        return _LoraLinear.apply(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                                 float(self.scaling[name]), p, dtype, self._int8_for(dtype))

    def _int8_for(self, dtype: torch.dtype) -> Int8Weight | None:
        """The base weight's int8 copy (`int8_base.use_int8_base`), for fp32 training forwards (the fused
        path already excludes a base weight that learns)."""
        int8 = getattr(self, "_int8_weight", None)
        return int8 if int8 is not None and torch.is_grad_enabled() and dtype == torch.float32 else None

    def _merged_forward(self, x: torch.Tensor, name: str, base: nn.Linear) -> torch.Tensor:
        # One matmul against W + s B A, built on first use inside `merged_for_inference` and in the
        # dtype the matmul runs in; what the unmerged layer computes, up to that dtype's rounding.
        dtype = matmul_dtype(x, base.weight)
        merged = getattr(self, "_merged_weight", None)
        if merged is None or merged.dtype != dtype:
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            merged = torch.addmm(base.weight.float(), b.float(), a.float(), alpha=float(self.scaling[name])).to(dtype)
            self._merged_weight = merged
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), merged, None if base.bias is None else base.bias.to(dtype))


@contextmanager
def merged_for_inference(model: nn.Module):
    """Within the block, every fused LoRA layer of `model` runs gradient-free forwards as one matmul
    against a merged copy of its weight (made on first use, dropped on exit).

    Generation is where it pays: at one token per row a LoRA layer's two extra small matmuls and
    the add cost about a quarter of a SmolLM2 decode step on a CPU (docs/rl.md). The copies take
    the adapted layers' weights once more in memory for the block's duration. Forwards with
    gradients, and layers outside the fused case, are computed as before.
    """
    layers = [m for m in model.modules() if isinstance(m, FusedLoraLinear)]
    for layer in layers:
        layer._merge_for_inference = True
    try:
        yield
    finally:
        for layer in layers:
            layer._merge_for_inference = False
            layer._merged_weight = None
