"""What the machine can do fast, measured rather than assumed."""

from __future__ import annotations

import functools
import time

import torch


def device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@functools.cache
def bf16_is_fast() -> bool:
    """True when bf16 matmuls beat fp32 on this device.

    On CUDA this is the hardware flag. On CPUs it depends on AVX512-BF16/AMX, which torch does
    not expose reliably, so a few-millisecond matmul race decides: on AVX2-only CPUs bf16 runs
    through a slow emulation path (measured 10-500x slower than fp32 on our CI machine).
    """
    dev = device_type()
    if dev == "cuda":
        return torch.cuda.is_bf16_supported()
    if dev != "cpu":
        return False
    a32 = torch.randn(256, 256)
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = a32.to(dtype)
        a @ a
        start = time.perf_counter()
        for _ in range(4):
            a @ a
        timings[dtype] = time.perf_counter() - start
    return timings[torch.bfloat16] < timings[torch.float32]


def resolve_precision(requested: str) -> str:
    """'auto' becomes bf16 where it is fast, else fp32 (fp16 only when asked for)."""
    if requested != "auto":
        return requested
    return "bf16" if bf16_is_fast() else "fp32"


TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
