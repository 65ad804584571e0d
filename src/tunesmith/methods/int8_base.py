"""`training.precision: int8`: a LoRA run's frozen base layers as int8 matmuls while it trains.

On a CPU without fast bf16 (AVX2 only) a LoRA step of a small model is ~80 % fp32 GEMMs at
their kernel's speed (docs/benchmarks.md), and int8 GEMMs (`torch._int_mm`, oneDNN) run about
twice as fast as fp32 ones there. The base weights are frozen, so each is quantized once, to
int8 rows with one scale per output row; the activations are quantized per token as they come.
Both matmuls of the frozen weight in a step use the one int8 copy:

- forward, y = x W^T: x to int8 per token (scale sx), y = (xq Wq^T) * sx * sw;
- backward, dL/dx = g W = (g * sw) Wq: g * sw to int8 per token, times Wq, times its scales.

Quantizing the backward's gradient per token is the SwitchBack scheme (Wortsman et al. 2023,
"Stable and low-precision training for large-scale vision-language models"); W itself needs no
gradient here, and the adapter's own matmuls stay fp32. The held-out loss after training moved by
0.2 % on the benchmark workload (docs/benchmarks.md). Training forwards only: evaluation and
generation (no gradient) keep the fp32 weights, so what is measured is the model that is saved.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import nn

SCALE_FLOOR = 1e-12  # an all-zero row quantizes to zeros instead of dividing by zero


_SCRATCH = threading.local()


def _scratch(role: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """This thread's reused buffer for one temporary of the int8 matmuls, grown as needed.

    Fresh int8 / int32 / fp32 temporaries per layer and step, between the step's activations,
    fragmented the heap: peak RSS grew ~70 MB a step for three steps (SmolLM2-135M LoRA).
    """
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    n = math.prod(shape)
    buf = buffers.get(role)
    if buf is None or buf.numel() < n:
        buf = buffers[role] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def quantize_rows(t: torch.Tensor, out: torch.Tensor | None = None,
                  buf: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, fp32 scales (rows, 1)) with t ~ values * scales, each row scaled by its absmax / 127.

    Into `out` (int8) when given, through `buf` (fp32, t's shape) when given.
    """
    buf = torch.abs(t, out=buf) if buf is not None else t.abs()
    scales = buf.amax(-1, keepdim=True).clamp_min_(SCALE_FLOOR).div_(127.0)
    torch.div(t, scales, out=buf).round_()
    if out is None:
        return buf.to(torch.int8), scales
    return out.copy_(buf), scales


class Int8Weight:
    """A frozen weight (out, in) as int8 rows (a view into `values`, or new) and one fp32 scale per output row."""

    def __init__(self, weight: torch.Tensor, values: torch.Tensor | None = None):
        self.values, scales = quantize_rows(weight.detach().float(), values)  # (out, in)
        self.scales = scales.view(1, -1)  # (1, out)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x (tokens, in) fp32 -> x W^T (tokens, out) fp32."""
        xq, xs = quantize_rows(x, _scratch("int8", x.shape, torch.int8), _scratch("fp32", x.shape, torch.float32))
        acc = torch._int_mm(xq, self.values.t(), out=_scratch("int32", (x.shape[0], self.values.shape[0]), torch.int32))
        return torch.mul(acc, xs).mul_(self.scales)

    def input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        """grad (tokens, out) fp32 -> grad W (tokens, in) fp32."""
        scaled = torch.mul(grad, self.scales, out=_scratch("grad", grad.shape, torch.float32))
        gq, gs = quantize_rows(scaled, _scratch("int8", grad.shape, torch.int8),
                               _scratch("fp32", grad.shape, torch.float32))
        acc = torch._int_mm(gq, self.values, out=_scratch("int32", (grad.shape[0], self.values.shape[1]), torch.int32))
        return torch.mul(acc, gs)


def use_int8_base(model: nn.Module, on: bool = True) -> int:
    """Give every fused LoRA layer of `model` on an fp32 CPU base weight an int8 copy of it for its
    training matmuls (on), or drop the copies (off); returns how many layers have one.

    All copies live in one block made now, before training allocates anything: 1 byte per base
    weight (a quarter of fp32), and no small int8 blocks between a step's activations on the heap.
    """
    from .fused_lora import FusedLoraLinear

    layers = [m for m in model.modules() if isinstance(m, FusedLoraLinear)]
    for layer in layers:
        layer._int8_weight = None
    _SCRATCH.__dict__.pop("buffers", None)
    if not on:
        return 0
    weights = [(layer, layer.get_base_layer().weight) for layer in layers
               if type(layer.get_base_layer()) is nn.Linear]
    weights = [(layer, w) for layer, w in weights if w.dtype == torch.float32 and w.device.type == "cpu"]
    block = torch.empty(sum(w.numel() for _, w in weights), dtype=torch.int8)
    start = 0
    for layer, w in weights:
        layer._int8_weight = Int8Weight(w, block[start:start + w.numel()].view(w.shape))
        start += w.numel()
    return len(weights)
