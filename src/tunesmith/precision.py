"""`training.precision: auto`: pick the precision and frozen-weight dtype by timing real training steps.

A bare matmul race says little about a training step: on an AVX512-BF16 CPU bf16 GEMMs are 2x
fp32, but a LoRA step also spends its time in casts, dropout masks, attention and element-wise
ops whose bf16 kernels may be slower than fp32 ones. So the candidates are timed on a proxy of
the real model (same config, two blocks, random weights, the run's method and objective) training
on one of the run's own rows (the longest that fits PROXY_MAX_TOKENS, collated as training does):

- `fp32`: fp32 weights, no autocast;
- `bf16`: fp32 weights under bf16 autocast (what the peers do);
- `bf16` with bf16 weights: the frozen base stored in bf16 (methods with a frozen base only),
  which saves autocast's per-step weight casts and half the weight memory.

The fastest wins; bf16 frozen weights also win when within 5 % of the fastest (the same speed
within noise, half the base's memory). Results are cached per machine (CPU model, flags, the kernel ISA
torch dispatches to and any oneDNN / MKL ISA cap, thread count, torch version) and model shape in the
tunesmith cache dir, so only the first run of a shape pays the few seconds. CUDA uses bf16 where the
GPU supports it (fp32 otherwise), with bf16 frozen weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .hardware import TORCH_DTYPES, bf16_is_fast, device_type
from .files import write_text_atomic

PROXY_LAYERS = 2
PROXY_MAX_TOKENS = 512
TIME_PER_CANDIDATE = 1.0  # seconds of timed proxy steps per candidate (3 to MAX_REPEATS rounds)
MAX_REPEATS = 6
# Part of the cache key: a choice timed by an earlier, noisier way of timing, or timed while
# the bf16 step still ran its CPU attention in bf16 (before version 3), is not reused.
TIMING_VERSION = 3
TIE_MARGIN = 0.05  # step times this close are within run-to-run noise on a shared 2-core machine
# Candidate -> (dtype of the frozen weights, bf16 autocast on); bf16-weights needs a frozen base.
CANDIDATES = {"fp32": (torch.float32, False), "bf16": (torch.float32, True), "bf16-weights": (torch.bfloat16, True)}
KERNEL_CAPS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers")


@dataclass
class PrecisionChoice:
    precision: str  # bf16 | fp16 | fp32 (what autocast runs in)
    weights: str  # dtype of frozen base weights: bf16 | fp16 | fp32
    how: str  # what decided it, for the log line
    timings: dict = field(default_factory=dict)  # candidate -> seconds per proxy step

    @property
    def weight_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.weights]


def _cpu_identity() -> str:
    model, flags = platform.processor(), ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = " ".join(sorted(f for f in line.split(":", 1)[1].split() if "avx" in f or "amx" in f))
                break
    except OSError:
        pass
    # The kernels torch, oneDNN and MKL actually dispatch to: a run capped to AVX2 on an AVX512
    # CPU (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS) has other speeds
    # than the same CPU uncapped, so it must not reuse the uncapped choice.
    caps = ",".join(f"{name}={os.environ[name]}" for name in KERNEL_CAPS if os.environ.get(name))
    return (f"{model}|{flags}|kernels={torch.backends.cpu.get_cpu_capability()}{'|' + caps if caps else ''}"
            f"|threads={torch.get_num_threads()}|torch={torch.__version__}")


def _shape_key(model_config, method_type: str, frozen_base: bool, auto_class: str, tokens: int) -> str:
    cfg = model_config.to_dict()
    shape = {k: cfg.get(k) for k in ("model_type", "hidden_size", "intermediate_size", "num_attention_heads",
                                      "num_key_value_heads", "vocab_size", "d_model", "d_ff", "n_embd")}
    return json.dumps({"shape": shape, "method": method_type, "frozen_base": frozen_base, "head": auto_class,
                       "tokens": tokens, "timing": TIMING_VERSION}, sort_keys=True)


def _cache_file():
    from .models import cache_dir

    return cache_dir() / "precision.json"


def _read_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, choice: PrecisionChoice) -> None:
    path = _cache_file()
    data = _read_cache()
    data[key] = {k: v for k, v in asdict(choice).items() if k != "how"}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=1))


def choose(requested: str, *, model_config=None, method=None, method_cfg=None, build_proxy: Callable | None = None,
           tokens: int = PROXY_MAX_TOKENS, echo: Callable[[str], None] | None = None,
           objective: str = "") -> PrecisionChoice:
    """The precision and frozen-weight dtype for a run.

    An explicit `requested` precision is kept (frozen weights follow it, as before). For
    `auto` on a CPU, `build_proxy(weight_dtype)` must return (model, step) where step() runs
    one training step of the proxy; without it (or when it fails) the matmul race decides.
    """
    frozen = bool(method is not None and method.frozen_base)
    if requested == "int8":  # fp32 throughout; the run switches its fused LoRA layers to int8 base matmuls
        return PrecisionChoice("fp32", "fp32", "asked for int8 base matmuls")
    if requested != "auto":
        return PrecisionChoice(requested, requested if frozen else "fp32", "asked for")
    dev = device_type()
    if dev != "cpu" or build_proxy is None or model_config is None:
        p = "bf16" if bf16_is_fast() else "fp32"
        return PrecisionChoice(p, p if frozen else "fp32", f"{dev}: bf16 {'supported' if p == 'bf16' else 'not fast'}")
    # The objective shapes the step (a reference forward, pairs, a teacher), so it is part of the key.
    key = _cpu_identity() + "|" + _shape_key(model_config, method.name, frozen, getattr(method, "auto_class", ""),
                                             tokens) + f"|objective={objective}"
    key = hashlib.sha256(key.encode()).hexdigest()[:24]
    cached = _read_cache().get(key)
    if cached:
        return PrecisionChoice(cached["precision"], cached["weights"], "measured on this machine earlier (cached)",
                               cached.get("timings", {}))
    try:
        timings = _time_candidates(build_proxy, frozen)
    except Exception as exc:  # a method the proxy cannot carry: fall back, and say so
        p = "bf16" if bf16_is_fast() else "fp32"
        if echo:
            echo(f"precision auto: could not time a proxy step ({type(exc).__name__}: {exc}); "
                 f"chose {p} from a matmul test")
        return PrecisionChoice(p, p if frozen else "fp32", "matmul test (proxy step failed)")
    best = _pick(timings)
    precision, weights = {"fp32": ("fp32", "fp32"), "bf16": ("bf16", "fp32"), "bf16-weights": ("bf16", "bf16")}[best]
    choice = PrecisionChoice(precision, weights, "measured now", timings)
    _write_cache(key, choice)
    return choice


def _time_candidates(build_proxy: Callable, frozen: bool) -> dict[str, float]:
    """Best step time per candidate, the candidates' steps interleaved round by round.

    Timed one candidate after the other, a neighbour's burst on a shared machine lands on one
    candidate only: the same proxy measured 0.29-0.47 s per bf16-weights step across four such
    runs. Interleaved, every candidate sees the same conditions (0.301 and 0.312 s in two builds).
    """
    from contextlib import nullcontext

    candidates = {k: v for k, v in CANDIDATES.items() if frozen or k != "bf16-weights"}
    steps = {}
    with torch.random.fork_rng(devices=[]):
        for name, (weights, autocast) in candidates.items():
            torch.manual_seed(0)
            steps[name] = (build_proxy(weights), autocast)

        def timed(name: str) -> float:
            step, autocast = steps[name]
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext():
                step()
            return time.perf_counter() - start

        for name in steps:
            timed(name)  # warm-up: first-call allocations and kernel selection
        best = {name: timed(name) for name in steps}
        mean = sum(best.values()) / len(best)
        rounds = min(MAX_REPEATS, max(3, int(TIME_PER_CANDIDATE / max(mean, 1e-6))))
        for _ in range(rounds - 1):
            for name in steps:
                best[name] = min(best[name], timed(name))
    return {name: round(t, 4) for name, t in best.items()}


def _pick(timings: dict[str, float]) -> str:
    """The fastest candidate, but bf16 frozen weights when they are within the timing noise of it:
    at the same speed they hold the base in half the memory."""
    best = min(timings, key=timings.get)
    lean = timings.get("bf16-weights")
    if lean is not None and lean <= timings[best] * (1 + TIE_MARGIN):
        return "bf16-weights"
    return best


def proxy_config(model_config):
    """The model's config cut to PROXY_LAYERS blocks (same widths, heads and vocabulary)."""
    import copy

    cfg = copy.deepcopy(model_config)
    for key in _LAYER_KEYS:
        if isinstance(getattr(cfg, key, None), int):
            setattr(cfg, key, min(getattr(cfg, key), PROXY_LAYERS))
    if hasattr(cfg, "layer_types") and isinstance(cfg.layer_types, list):
        cfg.layer_types = cfg.layer_types[:PROXY_LAYERS]
    return cfg
