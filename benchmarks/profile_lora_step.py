"""Profile one LoRA training step of the sft_throughput workload, per precision and weight dtype.

One packed 512-token row of the Alpaca rows that `sft_throughput.py` trains on, SmolLM2-135M
LoRA r=16 dropout 0.05 on all linear layers, one forward + backward + AdamW step. Each
configuration runs two warm-up steps, then `--repeats` timed steps (the best is reported),
then one step under torch.profiler, whose per-op table (self CPU time) is printed.

Configurations: precision fp32 / bf16 autocast over fp32 weights / bf16 autocast over bf16
frozen weights, each with tunesmith's step (fused LoRA layer, per-example segment attention,
fused LM head + cross-entropy) and with the plain step tunesmith ran before (peft's LoRA layer,
transformers' SDPA with a dense block-diagonal mask, full logits of the labelled positions).
Both run in one process with the allocator setting training uses (hardware.keep_freed_memory).

Usage:  python benchmarks/profile_lora_step.py [--precisions fp32 bf16 bf16-weights] [--paths tunesmith plain]
        [--rows 20] [--top 12]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sft_throughput import DEFAULT_DATA, HP, SMOLLM2  # noqa: E402

from tunesmith import scoring  # noqa: E402
from tunesmith.precision import CANDIDATES as PRECISIONS  # noqa: E402  the ones precision auto times

_fused_head = scoring._plain_head


def packed_batch(data: Path, rows: int, tokenizer) -> dict[str, torch.Tensor]:
    """The first packed training row tunesmith builds from the benchmark's data."""
    import tempfile

    from tunesmith.config import DataConfig
    from tunesmith.data.pipeline import build_data
    from tunesmith.objectives import OBJECTIVES

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.json"
        path.write_text(json.dumps(json.loads(data.read_text())[:rows]))
        bundle = build_data(DataConfig(train=str(path), max_length=HP["max_length"], packing=True), tokenizer,
                            seed=HP["seed"], packing=True)
    collate = OBJECTIVES["sft"]().collator(tokenizer, None, bundle.task, train=True)
    return collate([max(bundle.train, key=lambda r: len(r["input_ids"]))])


def build(path: str, weights: torch.dtype, tokenizer):
    from tunesmith.config import MethodConfig, ModelConfig
    from tunesmith.methods import METHODS, MethodContext
    from tunesmith.models import load_model
    from tunesmith.objectives import OBJECTIVES

    lora = METHODS["lora"]
    lora.fused = path == "tunesmith"
    scoring._plain_head = _fused_head if path == "tunesmith" else (lambda head: False)
    model_cfg = ModelConfig(name_or_path=SMOLLM2, attn_implementation=None if path == "tunesmith" else "sdpa")
    model = load_model(model_cfg, weights, tokenizer=tokenizer, echo=lambda _: None)
    method_cfg = MethodConfig(type="lora", r=HP["r"], alpha=HP["alpha"], dropout=HP["dropout"],
                              target_modules="all-linear")
    model = lora.apply(model, method_cfg, MethodContext(OBJECTIVES["sft"], tokenizer, None))
    lora.fused = True
    model.train()
    return model


def main() -> None:
    from tunesmith.config import ModelConfig, TrainingConfig
    from tunesmith.engine.optim import build_optimizer
    from tunesmith.hardware import ensure_threads, keep_freed_memory
    from tunesmith.models import load_tokenizer
    from tunesmith.objectives import OBJECTIVES, StepContext
    from tunesmith.quiet import quiet_libraries

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--precisions", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    p.add_argument("--paths", nargs="+", choices=["tunesmith", "plain"], default=["tunesmith", "plain"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()

    quiet_libraries()
    keep_freed_memory()
    print(f"threads: {ensure_threads()}; torch {torch.__version__}, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    tokenizer = load_tokenizer(ModelConfig(name_or_path=SMOLLM2))
    batch = packed_batch(args.data, args.rows, tokenizer)
    n_tokens = int(batch["input_ids"].numel())
    segments = int((batch["position_ids"] == 0).sum())
    print(f"row: {n_tokens} tokens in {segments} packed examples")
    objective = OBJECTIVES["sft"]()
    summary = {}
    for precision in args.precisions:
        weights, autocast = PRECISIONS[precision]
        for path in args.paths:
            torch.manual_seed(0)
            model = build(path, weights, tokenizer)
            optimizer = build_optimizer(model, TrainingConfig(learning_rate=HP["lr"]))
            ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else nullcontext

            def step() -> None:
                with ctx():
                    out = objective.loss(StepContext(model), batch)
                    loss = out.loss_sum / out.n_tokens
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            for _ in range(2):
                step()
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                step()
                best = min(best, time.perf_counter() - start)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                step()
            name = f"{precision}/{path}"
            summary[name] = {"step_s": round(best, 3), "tokens_per_s": round(n_tokens / best, 1)}
            print(f"\n## {name}: best step {best:.3f} s = {n_tokens / best:.0f} tok/s "
                  f"(weights {str(weights).split('.')[-1]}, autocast {'bf16' if autocast else 'off'})")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top,
                                            max_name_column_width=40))
            del model, optimizer
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
