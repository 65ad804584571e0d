"""`tunesmith plan`: what a run will need, worked out before a single weight of the model loads.

Parameter counts come from the model's config (the model built on the meta device: no memory,
no weights). Peak memory comes from two proxy runs of the very config: the same model with
PROXY_DEPTHS transformer blocks, random weights, the run's method, objective, precision, batch,
sequence length and data, each trained for PROXY_STEPS optimizer steps in a fresh process whose peak
resident memory (or, on a GPU, peak allocated memory) is read. What one more block costs comes from
the difference of the two, and the full model's peak is the smaller proxy's plus that for every
further block: weights, gradients, optimizer states, activations and the allocator's behaviour are all in
the measured numbers, none assumed. The split shown beside it is arithmetic: weights, gradients and
optimizer states from the parameter counts, the runtime (interpreter and libraries) as measured in
the proxy process, activations and step temporaries what remains.

A teacher (distillation) or reward model (PPO) is loaded whole, real weights, in both proxies: its
cost does not depend on the trained model's depth, so it cancels from the per-block slope and stays
in the estimate once; the split shows its weights on a line of their own.

For a GPU the run is not on (`--gpu A100-80GB`), the estimate is arithmetic on the same counts in
CUDA's defaults (bf16 compute, bf16 frozen weights) with the activations the CPU proxy measured
scaled to bf16, plus the CUDA context; the line says it is a calculation, not a measurement.

`--measure` also trains the real model (real weights) for a few steps in a fresh process and
reports its tokens/s and peak memory beside the estimate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .config import ModelConfig, RunConfig, load_config
from .errors import ConfigError, TunesmithError

PROXY_STEPS = 3  # later steps' peaks include what the first left allocated; steps 2.. are timed
PROXY_DEPTHS = (2, 6)  # transformer blocks of the two proxies
MEASURE_STEPS = 4  # real steps for --measure; the first is warm-up and not timed
MB = 1 << 20
GB = 1 << 30
NF4_BYTES = 0.5625  # a 4-bit weight with its share of the block scales
CUDA_CONTEXT = 600 * MB  # the CUDA runtime and kernels' share of the card, before any tensor
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_SAVED_CLASSES = ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForMaskedLM")

# Memory of common cards as their drivers report it (GiB); what `--gpu NAME` can name.
GPUS = {"T4": 15, "L4": 22, "A10G": 22, "RTX-3090": 24, "RTX-4090": 24, "L40S": 45, "A100-40GB": 40,
        "A100-80GB": 80, "H100-80GB": 80, "H200": 141, "B200": 180}


@dataclass
class Plan:
    model: str
    layers: int
    total_params: int
    trainable_params: int
    micro_batch: str  # rows x tokens of one micro-batch
    precision: str  # what the proxies trained in (as the run will)
    device: str
    memory: dict[str, int]  # weights, gradients, optimizer, runtime, activations (bytes)
    peak: int  # estimated peak memory of the run (bytes)
    available: int  # this machine's memory (or the GPU's)
    proxies: list[dict] = field(default_factory=list)  # per proxy: blocks, peak, trainable, step_s
    step_s: float | None = None  # estimated seconds per optimizer step (from the proxies)
    tokens_per_step: int = 0
    gpu: dict | None = None  # --gpu: name, memory, estimate, fits
    measured: dict | None = None  # --measure: peak, tokens_per_s, step_s of the real model
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.peak <= self.available

    def to_dict(self) -> dict:
        return asdict(self) | {"fits": self.fits}


def plan(config: str | Path | dict | RunConfig, overrides: list[str] | None = None, *, gpu: str | None = None,
         measure: bool = False, echo: Callable[[str], None] = lambda m: None) -> Plan:
    """Estimate the run's parameters, peak memory and speed before loading its weights."""
    cfg = load_config(config, overrides)
    if gpu is not None and gpu not in GPUS:
        raise ConfigError(f"--gpu: unknown card '{gpu}' (known: {', '.join(GPUS)})")
    config_obj = model_config(cfg)
    layers = next((getattr(config_obj, k) for k in _LAYER_KEYS if isinstance(getattr(config_obj, k, None), int)), None)
    if layers is None:
        raise ConfigError(f"tunesmith plan: the config of {cfg.model.name_or_path} names no layer count "
                          f"({', '.join(_LAYER_KEYS)}), so it cannot be planned block by block")
    total = _meta_param_count(config_obj, cfg)
    echo(f"model: {config_obj.model_type}, {layers} blocks, {total / 1e6:.1f}M parameters (from its config)")
    # Two depths far enough apart that run-to-run noise in one peak (~0.1 GB) moves the per-block cost little;
    # a model no deeper than the larger proxy is measured whole (random weights).
    depths = PROXY_DEPTHS if layers > PROXY_DEPTHS[1] else (layers,)
    proxies = []
    with tempfile.TemporaryDirectory(prefix="tunesmith-plan-") as tmp:
        for blocks in depths:
            echo(f"proxy: {blocks}-block copy, random weights, {PROXY_STEPS} steps in a fresh process ...")
            proxies.append(_run_child("proxy", cfg, Path(tmp) / f"proxy{blocks}", blocks=blocks))
        measured = _run_child("measure", cfg, Path(tmp) / "real") if measure else None
    one, last = proxies[0], proxies[-1]
    span = max(last["blocks"] - one["blocks"], 1)

    def at_depth(key: str) -> float:
        if len(proxies) == 1:
            return one[key]
        return one[key] + (layers - one["blocks"]) * max((last[key] - one[key]) / span, 0)

    trainable, peak = int(round(at_depth("trainable"))), int(at_depth("peak"))
    step_s = at_depth("step_s") if one.get("step_s") and last.get("step_s") else None
    memory = _split(cfg, one, total, trainable, peak)
    # The arithmetic floor: what must be resident whatever the proxies saw (a noisy proxy pair can
    # extrapolate below it).
    peak = sum(memory.values())  # activations are never below 0, so never below the fixed parts
    device = one["device"]
    p = Plan(model=cfg.model.name_or_path, layers=layers, total_params=total, trainable_params=trainable,
             micro_batch=f"{cfg.training.batch_size} x {cfg.data.max_length} tokens", precision=one["precision"],
             device=device, memory=memory, peak=peak, available=one["available"], proxies=proxies,
             step_s=step_s, tokens_per_step=one.get("tokens_per_step", 0), measured=measured)
    if gpu is not None:
        p.gpu = _gpu_estimate(gpu, cfg, total, trainable, memory, one["precision"])
    if cfg.training.grad_accum > 1:
        p.notes.append(f"grad_accum {cfg.training.grad_accum}: micro-batches run one after another, so the peak "
                       "is one micro-batch's")
    if cfg.eval.every or cfg.has_validation:
        p.notes.append("evaluation runs without gradients and stays below the training peak")
    return p


def model_config(cfg: RunConfig):
    """The trained model's transformers config, read without its weights (a GGUF file's header is parsed);
    with model.init_from_teacher_every, the teacher's config cut to the blocks the student keeps."""
    every = cfg.model.init_from_teacher_every
    if every is None:
        return _read_config(cfg.model, "model.name_or_path")
    from .models import kept_layers, thinned_config
    from .teacher import source_model

    # The student is built as models.student_from_teacher builds it (which also needs num_hidden_layers).
    config = _read_config(source_model(cfg.objective.teacher), "objective.teacher")
    n = config.num_hidden_layers
    return thinned_config(config, n, kept_layers(n, every))


def _read_config(model: ModelConfig, field: str):
    from transformers import AutoConfig

    folder, gguf = _source(model, field)
    try:
        return AutoConfig.from_pretrained(folder, gguf_file=gguf, trust_remote_code=model.trust_remote_code,
                                          revision=model.revision)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{field}: cannot read the model's config from {model.name_or_path}: {exc}") from None


def _source(model: ModelConfig, field: str = "model.name_or_path") -> tuple[str, str | None]:
    """Where the config and tokenizer are read: a GGUF file's converted copy when a run made one (its
    header parses in milliseconds, the GGUF's in seconds), else the file itself."""
    from .models import gguf_cache, resolve_source

    folder, gguf = resolve_source(model, field)
    if gguf is not None and (gguf_cache(folder, gguf) / "config.json").is_file():
        return str(gguf_cache(folder, gguf)), None
    return folder, gguf


def _meta_param_count(config_obj, cfg: RunConfig) -> int:
    import torch
    import transformers

    from .objectives import run_objective

    auto = run_objective(cfg).auto_class
    with torch.device("meta"):
        model = getattr(transformers, auto).from_config(config_obj)
    seen, total = set(), 0
    for p in model.parameters():  # tied weights once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _quantized_bytes(cfg: RunConfig) -> float | None:
    """Bytes per frozen weight of a QLoRA base (8-bit: one; 4-bit: NF4 with its scales); None otherwise."""
    if cfg.method.type != "qlora":
        return None
    return 1 if getattr(cfg.method, "bits", 4) == 8 else NF4_BYTES


def _split(cfg: RunConfig, proxy: dict, total: int, trainable: int, peak: int) -> dict[str, int]:
    """Peak memory by kind: weights, gradients and optimizer states from the counts; runtime as the proxy
    measured it; activations and step temporaries the rest of the estimated peak."""
    frozen = total - trainable
    frozen_bytes = frozen * (_quantized_bytes(cfg) or proxy["weight_bytes"])
    weights = int(frozen_bytes + trainable * 4)
    grads, optim = trainable * 4, trainable * 8  # fp32 gradients; AdamW's two fp32 moments
    runtime, second = proxy["runtime"], proxy.get("second_model", 0)
    activations = max(peak - weights - grads - optim - runtime - second, 0)
    split = {"weights": weights, "gradients": grads, "optimizer": optim, "runtime": runtime}
    if second:
        split["second_model"] = second
    return split | {"activations": activations}


def _gpu_estimate(name: str, cfg: RunConfig, total: int, trainable: int, cpu_memory: dict, precision: str) -> dict:
    """What the run needs on a named card, computed: CUDA trains in bf16 with bf16 frozen weights."""
    frozen = total - trainable
    frozen_bytes = frozen * (_quantized_bytes(cfg) or 2)
    weights = frozen_bytes + trainable * 4
    # int8 (CPU only) trains the proxy's activations in fp32 too; on the card the run would be bf16.
    to_bf16 = 0.5 if precision.startswith(("fp32", "int8")) else 1.0
    act = cpu_memory["activations"] * to_bf16
    # A teacher or reward model computes in the compute dtype: bf16 on the card.
    second = cpu_memory.get("second_model", 0) * to_bf16
    need = int(weights + trainable * 12 + act + second + CUDA_CONTEXT)
    card = GPUS[name] * GB
    return {"name": name, "memory": card, "estimate": need, "fits": need <= card * 0.95,
            "how": "calculated: bf16 compute and frozen weights, activations from the CPU proxy scaled to bf16, "
                   f"{CUDA_CONTEXT // MB} MB CUDA context"
                   + ("; training.precision int8 is CPU-only, so this assumes bf16 there" if precision.startswith("int8")
                      else "")}


def _child_config(cfg: RunConfig, out: Path, model_dir: Path | None) -> dict:
    """The run's config for a proxy or measuring run: short, silent, nothing kept."""
    data = cfg.plain()
    t = cfg.training
    rows_needed = t.batch_size * t.grad_accum * (MEASURE_STEPS + 1) * (8 if cfg.packing_enabled else 1)
    if model_dir is not None:  # the proxy is the student itself (not cut from the teacher again)
        data["model"] = {**data["model"], "name_or_path": str(model_dir), "gguf_file": None, "tokenizer": None,
                         "init_from_teacher_every": None, "head_from": None}  # a probe of the real base
    for section in [t["data"] for t in data["tasks"]] if cfg.tasks else [data["data"]]:  # every task's rows
        section["max_samples"] = min(section["max_samples"] or rows_needed, rows_needed)
        section["split"] = {"validation_ratio": 0.0, "validation_file": None}
    data["training"] |= {"max_steps": PROXY_STEPS if model_dir is not None else MEASURE_STEPS, "epochs": 1,
                         "log_every": 1, "save_every": None, "progress": False, "max_minutes": None,
                         "checkpoint_on_interrupt": False}
    data["eval"] |= {"every": None, "at_end": False, "forgetting": False, "early_stopping_patience": None}
    data["tracking"] = {}
    data["output"] = {**data["output"], "dir": str(out), "name": "run", "overwrite": True, "save_model": False,
                      "model_card": False}
    return data


def _run_child(kind: str, cfg: RunConfig, folder: Path, blocks: int = 0) -> dict:
    """Run a proxy (or the real model, for --measure) in a fresh process: its peak memory is its own."""
    folder.mkdir(parents=True)
    request = folder / "request.json"
    request.write_text(json.dumps({"kind": kind, "config": cfg.plain(), "blocks": blocks,
                                   "folder": str(folder)}))
    proc = subprocess.run([sys.executable, "-m", "tunesmith.planning", str(request)], capture_output=True,
                          text=True)
    answer = folder / "answer.json"
    if proc.returncode != 0 or not answer.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        what = f"the {blocks}-block proxy" if kind == "proxy" else "the measuring run"
        raise TunesmithError(f"tunesmith plan: {what} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(answer.read_text())


def _child(request_file: str) -> None:
    """In the fresh process: build the proxy (or take the real model), train a few steps, report."""
    import gc

    req = json.loads(Path(request_file).read_text())
    folder = Path(req["folder"])
    from . import api  # noqa: F401 (the libraries a run imports, before measuring the runtime)
    from .hardware import device_type, rss_bytes, trim_heap
    import peft  # noqa: F401
    import torch

    cfg = load_config(req["config"])
    model_dir = _write_proxy(cfg, folder / "model", req["blocks"]) if req["kind"] == "proxy" else None
    run_cfg = _child_config(cfg, folder / "out", model_dir)
    # precision auto's timing race (its own proxy models) runs once per machine and shape, in whichever
    # proxy comes first: settled here, it would otherwise inflate that proxy's peak alone and flatten
    # the per-block slope (a cold cache planned 2,547 MB for a run that peaked at 3,951 MB).
    api.decide_precision(run_cfg)
    gc.collect()
    trim_heap()  # the race's freed models, kept by glibc, are not part of the run's resident size
    runtime = rss_bytes()
    if model_dir is not None:
        _reset_peak_rss()  # the proxy's own writing is not part of the run it stands for
    on_gpu = device_type() == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    result = api.train(run_cfg, echo=lambda m: None)
    steps = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = sorted(s["tokens_per_s"] for s in steps if "tokens_per_s" in s and s.get("step", 0) > 1)
    tokens_per_s = timed[len(timed) // 2] if timed else None  # the median: one stalled step is noise
    train = result.throughput
    tokens_per_step = train["train_tokens"] / max(result.steps, 1)
    if on_gpu:
        peak, available = torch.cuda.max_memory_allocated() + CUDA_CONTEXT, torch.cuda.mem_get_info()[1]
    else:
        peak, available = _peak_rss(), _machine_memory()
    answer = {"blocks": req["blocks"], "peak": peak, "runtime": runtime, "trainable": result.trainable_params,
              "total": result.total_params, "second_model": result.second_model_bytes,
              "precision": result.precision, "device": device_type(),
              "weight_bytes": torch.tensor([], dtype=result.weight_dtype or torch.float32).element_size(),
              "tokens_per_s": tokens_per_s, "tokens_per_step": tokens_per_step,
              "step_s": tokens_per_step / tokens_per_s if tokens_per_s else None, "available": available}
    (folder / "answer.json").write_text(json.dumps(answer))


def _write_proxy(cfg: RunConfig, out: Path, blocks: int) -> Path:
    """The run's model cut to `blocks` transformer blocks with random weights, saved as a model folder."""
    import torch
    import transformers

    from .objectives import run_objective

    config_obj = model_config(cfg)
    for key in _LAYER_KEYS:
        if isinstance(getattr(config_obj, key, None), int):
            setattr(config_obj, key, blocks)
    if isinstance(getattr(config_obj, "layer_types", None), list):
        config_obj.layer_types = config_obj.layer_types[:blocks]
    auto = run_objective(cfg).auto_class
    torch.manual_seed(0)
    model = getattr(transformers, auto if auto in _SAVED_CLASSES else "AutoModel").from_config(config_obj)
    model.save_pretrained(out)
    folder, gguf = _source(cfg.model)
    # The tokenizer alone (a GGUF file's is in its header): the proxy run loads it from the proxy's folder.
    source = cfg.model.tokenizer or folder
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        source, gguf_file=None if cfg.model.tokenizer else gguf, trust_remote_code=cfg.model.trust_remote_code)
    tokenizer.save_pretrained(out)
    return out


def _reset_peak_rss() -> None:
    """Start this process's peak resident size (VmHWM) afresh from now (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss() -> int:
    """Peak resident size since start or the last reset (VmHWM); ru_maxrss where /proc is missing."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _machine_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def render(p: Plan) -> str:
    """The plan as the CLI prints it."""
    def mb(n: float) -> str:
        return f"{n / MB:,.0f} MB"

    pct = 100 * p.trainable_params / max(p.total_params, 1)
    lines = [f"model        {p.model}", f"             {p.layers} blocks, {p.total_params:,} parameters; "
             f"{p.trainable_params:,} trainable ({pct:.3f}%)",
             f"micro-batch  {p.micro_batch}; trains in {p.precision} on {p.device}",
             f"memory       estimated peak {mb(p.peak)} of {mb(p.available)} "
             f"({'fits' if p.fits else 'DOES NOT FIT'})"]
    what = {"weights": "weights", "gradients": "gradients", "optimizer": "optimizer states (AdamW)",
            "runtime": "runtime (interpreter, libraries)", "second_model": "teacher / reward model (frozen)",
            "activations": "activations and step temporaries"}
    lines += [f"  {what[k]:34} {mb(v):>10}" for k, v in p.memory.items()]
    per_block = ((p.proxies[-1]["peak"] - p.proxies[0]["peak"]) / (p.proxies[-1]["blocks"] - p.proxies[0]["blocks"])
                 if len(p.proxies) > 1 else None)
    lines.append("  from proxies: " + "; ".join(f"{x['blocks']} block{'s' if x['blocks'] > 1 else ''} "
                                                f"{mb(x['peak'])}" for x in p.proxies)
                 + (f"; +{mb(per_block)} per block" if per_block is not None else " (the whole depth)"))
    if p.step_s:
        lines.append(f"speed        ~{p.step_s:.2f} s per step, ~{p.tokens_per_step / p.step_s:,.0f} tokens/s "
                     "(rough: from the proxies' timed steps, which ran 30-45 % fast for SmolLM2; --measure times the real model)")
    if p.gpu:
        g = p.gpu
        lines.append(f"gpu          {g['name']} ({g['memory'] / GB:.0f} GiB): needs ~{g['estimate'] / GB:.1f} GiB, "
                     f"{'fits' if g['fits'] else 'does not fit'} ({g['how']})")
    if p.measured:
        m = p.measured
        err = 100 * (p.peak - m["peak"]) / m["peak"]
        lines.append(f"measured     real model, {MEASURE_STEPS} steps: peak {mb(m['peak'])} (estimate {err:+.0f}%), "
                     f"{m['tokens_per_s'] or 0:,.0f} tokens/s, {m['step_s'] or 0:.2f} s per step")
    lines += [f"note         {n}" for n in p.notes]
    return "\n".join(lines)


if __name__ == "__main__":  # the proxy's fresh process (see _run_child)
    _child(sys.argv[1])
