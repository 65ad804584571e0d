"""GPU fine-tuning throughput, MFU and peak memory: tunesmith vs TRL SFTTrainer, one invocation.

What it measures
    LoRA (r=16, alpha=32, dropout 0.05, all linear layers) and full fine-tuning of randomly
    initialised Llama models of real shapes, with tunesmith and with TRL's SFTTrainer (+ peft
    for LoRA), each run in its own process:
      1b  Llama-3.2-1B shape: hidden 2048, 16 layers, 32 heads / 8 kv heads, intermediate 8192,
          vocab 128256, tied embeddings, llama3 RoPE (theta 500000)
      8b  Llama-3.1-8B shape: hidden 4096, 32 layers, 32 heads / 8 kv heads, intermediate 14336,
          vocab 128256, untied
    For every run: tokens/s over the timed steps, MFU, peak GPU memory
    (torch.cuda.max_memory_allocated, model load included, same for both tools), peak RSS.

How
    The model is built in-process with transformers' LlamaConfig / LlamaForCausalLM (random
    weights; throughput does not depend on them), saved in bf16 with save_pretrained together
    with a word-level tokenizer whose word "w<i>" is token id i, so the synthetic text maps to
    exactly the token ids we drew. The data are random documents whose lengths are powers of
    two (64 ... seq_len), generated seq_len tokens at a time: both tools' packers (tunesmith's
    first-fit-decreasing, TRL's best-fit-decreasing) then fill every packed row exactly, so both
    see the same number of tokens per optimizer step (batch x seq_len), with no padding.
    tunesmith gets the documents as a `text` JSONL (objective causal_lm, data.packing: true; it
    appends the EOS token); TRL gets the same token ids, EOS included, pre-tokenized.

    Each run does --warmup untimed optimizer steps (CUDA init, allocator growth, cuBLAS
    heuristics) and then --steps timed ones. tunesmith: per-step tokens/s records from the
    run's metrics.jsonl (training.log_every: 1) after the warmup; the loop times each step on
    the host, and the device syncs inside each step (loss.item, grad-norm) make that step time
    include the previous step's queued optimizer kernels, so the timed window is the GPU time of
    the timed steps. TRL: a TrainerCallback takes torch.cuda.synchronize()d timestamps at the end
    of the warmup step and of the last step.

    Settings on both sides: bf16 autocast; LoRA base weights bf16 with fp32 adapters; full
    fine-tuning with bf16 weights and AdamW states (pure bf16, what TRL does with a bf16
    checkpoint); gradient checkpointing off for 1b, on for 8b (8B full fine-tuning does not fit
    in 141 GB at 2048 tokens without it). Attention (--attn default): tunesmith's own, one causal
    SDPA call per packed document; TRL's "sdpa". --attn sdpa / flash_attention_2 / eager gives both
    tools that transformers implementation instead.
    TRL: packing_strategy "bfd" (which turns padding_free on). With sdpa, padding-free
    flattens the whole micro-batch into one sequence and attends over B x seq_len positions
    under a block-diagonal mask (B times the attention FLOPs of separate rows), so under sdpa
    TRL gets micro-batch 1 x gradient accumulation B (the same tokens per optimizer step, one
    packed row per forward); with flash attention it gets micro-batch B. --trl-micro-batch
    overrides.

MFU
    model FLOPs / s / peak, peak = --peak-tflops (989 TFLOP/s: H100/H200 SXM dense bf16).
    N = parameters that take part in a matmul: every Linear in the decoder layers plus the LM
    head (the embedding lookup and the norms are not counted; a tied embedding counts once,
    as the LM head). FLOPs per token:
      full  6 N   (forward 2N, backward 4N: activation and weight gradients)
      lora  4 N   (forward 2N, activation gradients 2N; the frozen base has no weight
                   gradients; the adapters' own FLOPs, < 1 %, are left out)
    `mfu` (the one the target is about) uses these. `mfu_with_attention` adds causal
    per-document attention, 6 * layers * hidden * sum(n^2)/sum(n) per token (QK^T and AV
    forward 2 * hidden * n per token, backward twice the forward), n the document lengths.
    Gradient-checkpointing recomputation is not counted (model FLOPs, not hardware FLOPs).

Targets (the 1b LoRA run): tunesmith >= 1.5x TRL tokens/s, and tunesmith MFU >= 40 %.

Usage
    GPU box (pip install -e '.[bench]' for TRL; a CUDA build of torch):
        python benchmarks/gpu_sft.py                       # 1b and 8b, lora and full, both tools
        python benchmarks/gpu_sft.py --models 1b --methods lora --steps 20
    Anywhere (CPU, tiny Llama, seconds; checks the script, not the numbers):
        python benchmarks/gpu_sft.py --smoke --tools tunesmith
    Options: --models 1b 8b  --methods lora full  --tools tunesmith trl  --steps 10  --warmup 3
             --seq-len 2048  --batch-size B  --attn default  --peak-tflops 989  --keep  --timeout 480
Each run's result is printed as a `RUN {json}` line as soon as it ends, and appended to
$OUT/gpu_sft_runs.jsonl when $OUT is set (a device command cut off at its time limit keeps what
finished); the summary goes to $OUT/gpu_sft.json too.
The output is a table; the last line is one JSON object with every run's numbers, the
tunesmith/TRL ratios and the targets with pass/fail.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

H100_BF16_DENSE_TFLOPS = 989.0  # H100 / H200 SXM, dense bf16 (no sparsity)
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]  # ids 0, 1, 2; words "w3", "w4", ... are ids 3, 4, ...
PAD_ID, EOS_ID = 0, 1

# Real shapes (from the models' config.json); random weights.
SHAPES: dict[str, dict[str, Any]] = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rms_norm_eps=1e-5,
               max_position_embeddings=131072, head_dim=64,
               rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192}),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, rms_norm_eps=1e-5,
               max_position_embeddings=131072, head_dim=128,
               rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192}),
    # --smoke: a few seconds on a CPU.
    "smoke": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=512, tie_word_embeddings=True, rms_norm_eps=1e-5,
                  max_position_embeddings=1024, head_dim=16,
                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}
# Rows of seq_len tokens per optimizer step (no accumulation), chosen to fill an H200 without
# running out of memory in either tool; --batch-size overrides.
DEFAULT_BATCH = {"1b": 8, "8b": 4, "smoke": 2}
# 8B full fine-tuning needs gradient checkpointing to fit; all 8b runs use it, for both tools.
GRAD_CKPT = {"1b": False, "8b": True, "smoke": False}
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
LR = {"lora": 2e-4, "full": 1e-5}
SEED = 0
MIN_DOC = 64  # shortest synthetic document on GPU runs (16 with --smoke)
NO_GPU_MESSAGE = ("no CUDA GPU is present: this benchmark measures GPU throughput and MFU. "
                  "Run it on a GPU machine, or pass --smoke for the tiny CPU check of the script itself.")


# ---------------------------------------------------------------- model, tokenizer and data


def build_model_folder(shape: str, folder: Path, on_gpu: bool) -> None:
    """A random-init Llama of the given shape plus a word-level tokenizer, saved in bf16."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    spec = SHAPES[shape]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), spec["vocab_size"])})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", model_max_length=spec["max_position_embeddings"])
    fast.save_pretrained(folder)

    config = LlamaConfig(**spec, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=None)
    torch.manual_seed(SEED)
    # Initialising 8B parameters on the GPU takes seconds; on the CPU, minutes. bf16 from the
    # start halves the memory and is the dtype both tools load.
    with torch.device("cuda" if on_gpu else "cpu"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)


def split_row(length: int, min_doc: int, rng: random.Random) -> list[int]:
    """Cut one packed row into documents whose lengths are powers of two.

    Lengths that divide each other make first-fit-decreasing and best-fit-decreasing packing
    exact: every packed row comes out full again, in both tools.
    """
    if length <= min_doc or rng.random() < 0.3:
        return [length]
    return split_row(length // 2, min_doc, rng) + split_row(length // 2, min_doc, rng)


def write_data(folder: Path, rows: int, seq_len: int, vocab_size: int, min_doc: int) -> dict:
    """Random documents filling `rows` packed rows: text JSONL (tunesmith) and token ids (TRL)."""
    rng = random.Random(SEED)
    lengths = [n for _ in range(rows) for n in split_row(seq_len, min_doc, rng)]
    rng.shuffle(lengths)
    docs = [[rng.randrange(len(SPECIAL_TOKENS), vocab_size) for _ in range(n - 1)] + [EOS_ID] for n in lengths]
    with (folder / "train.jsonl").open("w") as f:
        for ids in docs:
            # tunesmith's text path appends the EOS itself.
            f.write(json.dumps({"text": " ".join(f"w{i}" for i in ids[:-1])}) + "\n")
    (folder / "train_ids.json").write_text(json.dumps(docs))
    return {"documents": len(docs), "tokens": sum(lengths),
            "mean_doc_len": sum(lengths) / len(lengths),
            # token-weighted mean context of causal attention, for the attention FLOPs
            "attn_len": sum(n * n for n in lengths) / sum(lengths)}


# ---------------------------------------------------------------- FLOPs


def matmul_params(shape: str) -> int:
    """Parameters that take part in a matmul: decoder Linears plus the LM head."""
    s = SHAPES[shape]
    d, q = s["hidden_size"], s["num_attention_heads"] * s["head_dim"]
    kv = s["num_key_value_heads"] * s["head_dim"]
    per_layer = 2 * d * q + 2 * d * kv + 3 * d * s["intermediate_size"]  # q,o + k,v + gate,up,down
    return s["num_hidden_layers"] * per_layer + s["vocab_size"] * d


def flops_per_token(shape: str, method: str, attn_len: float) -> tuple[float, float]:
    """(dense model FLOPs per token, attention FLOPs per token); see the module docstring."""
    s = SHAPES[shape]
    dense = (6 if method == "full" else 4) * matmul_params(shape)
    attention = 6 * s["num_hidden_layers"] * s["num_attention_heads"] * s["head_dim"] * attn_len
    return float(dense), float(attention)


FLOPS_FORMULA = ("full: 6*N per token; lora: 4*N per token (frozen base: forward 2N + activation gradients 2N, "
                 "no weight gradients; adapter FLOPs left out); N = matmul parameters (decoder Linears + LM head, "
                 "no embedding lookup); mfu_with_attention adds 6*layers*hidden*sum(n^2)/sum(n) per token "
                 "(causal per-document attention, forward+backward); recompute not counted")


# ---------------------------------------------------------------- workers (one process per run)


def _peaks() -> dict:
    import torch

    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"peak_gpu_mem_mb": gpu, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _dtypes(cuda: bool, method: str) -> str:
    if not cuda:
        return "fp32 (CPU smoke)"
    return "bf16 autocast, " + ("LoRA base bf16 + fp32 adapters" if method == "lora" else "weights + AdamW bf16")


def run_tunesmith(a: argparse.Namespace) -> dict:
    import torch

    import tunesmith

    cuda = torch.cuda.is_available()
    total = a.warmup + a.steps
    tokens_per_step = a.batch_size * a.seq_len
    method = ({"type": "lora", **LORA, "target_modules": "all-linear"} if a.method == "lora" else {"type": "full"})
    model = {"name_or_path": a.model_dir}
    if a.attn != "default":
        model["attn_implementation"] = a.attn
    if a.method == "full":
        # Pure bf16 weights and AdamW states, as TRL trains a bf16 checkpoint (tunesmith's
        # default keeps learning weights in fp32). LoRA's frozen base is bf16 by default.
        model["dtype"] = "bf16" if cuda else "fp32"
    cfg = {
        "model": model,
        "data": {"train": str(Path(a.data_dir) / "train.jsonl"), "format": "text", "max_length": a.seq_len,
                 "packing": True, "shuffle": True},
        "objective": {"type": "causal_lm"},
        "method": method,
        "training": {"max_steps": total, "batch_size": a.batch_size, "grad_accum": 1, "learning_rate": LR[a.method],
                     "scheduler": "cosine", "precision": "bf16" if cuda else "fp32",
                     "gradient_checkpointing": a.grad_ckpt, "log_every": 1, "progress": False, "seed": SEED},
        "eval": {"at_end": False, "forgetting": False},
        "output": {"dir": str(Path(a.work) / f"tunesmith-{a.model}-{a.method}"), "overwrite": True,
                   "save_model": False, "model_card": False},
    }
    result = tunesmith.train(cfg, echo=lambda m: print("  [tunesmith]", m, file=sys.stderr, flush=True))
    peaks = _peaks()
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines() if line]
    steps = [r for r in records if "tokens_per_s" in r]
    timed = [r for r in steps if r["step"] > a.warmup]
    # With every packed row full, each step carries batch x seq_len tokens; then the timed
    # window's seconds are the sum of tokens_per_step / tokens_per_s over its steps.
    rows_full = result.throughput["train_tokens"] == total * tokens_per_step and len(steps) == total
    seconds = sum(tokens_per_step / r["tokens_per_s"] for r in timed)
    return {
        "tokens_per_s": len(timed) * tokens_per_step / seconds if timed else None,
        "timed_steps": len(timed), "timed_seconds": seconds, "rows_full": rows_full,
        "all_steps_tokens_per_s": result.throughput["train_tokens_per_s"],
        "trainable_params": result.trainable_params, "total_params": result.total_params,
        "final_loss": result.metrics.get("loss"), **peaks,
        "settings": (f"{_dtypes(cuda, a.method)}, batch {a.batch_size}x{a.seq_len} packed (FFD), "
                     f"{'per-document SDPA (tunesmith default)' if a.attn == 'default' else a.attn}, "
                     f"grad ckpt {'on' if a.grad_ckpt else 'off'}, {'fused ' if cuda else ''}torch AdamW (tunesmith default)"),
    }


def run_trl(a: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    total = a.warmup + a.steps
    micro = a.trl_micro_batch or (a.batch_size if a.attn.startswith("flash") else 1)
    if a.batch_size % micro:
        raise SystemExit(f"--trl-micro-batch {micro} does not divide --batch-size {a.batch_size}")

    class StepTimer(TrainerCallback):
        """Synchronised timestamps at the end of the warmup and of the last optimizer step."""

        def __init__(self) -> None:
            self.start: float | None = None
            self.end: float | None = None

        def _now(self) -> float:
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            if a.warmup == 0 and state.global_step == 0 and self.start is None:
                self.start = self._now()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == a.warmup and a.warmup > 0:
                self.start = self._now()
            if state.global_step == total:
                self.end = self._now()

    torch.manual_seed(SEED)
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    attn = "sdpa" if a.attn == "default" else a.attn
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation=attn)
    docs = json.loads((Path(a.data_dir) / "train_ids.json").read_text())
    peft_config = None
    if a.method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    args = SFTConfig(
        output_dir=str(Path(a.work) / f"trl-{a.model}-{a.method}"), max_steps=total,
        per_device_train_batch_size=micro, gradient_accumulation_steps=a.batch_size // micro,
        learning_rate=LR[a.method], lr_scheduler_type="cosine", warmup_steps=0, seed=SEED,
        max_length=a.seq_len, packing=True, packing_strategy="bfd", padding_free=True,
        bf16=cuda, use_cpu=not cuda, gradient_checkpointing=a.grad_ckpt,
        gradient_checkpointing_kwargs={"use_reentrant": False} if a.grad_ckpt else None,
        logging_steps=total, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0,
    )
    timer = StepTimer()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": docs}),
                         processing_class=tok, peft_config=peft_config, callbacks=[timer])
    row_lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
    rows_full = len(row_lengths) == total * a.batch_size and all(n == a.seq_len for n in row_lengths)
    # Tokens per optimizer step: exact when the rows are full, else the mean packed row.
    tokens_per_step = a.batch_size * sum(row_lengths) / len(row_lengths)
    out = trainer.train()
    peaks = _peaks()
    seconds = timer.end - timer.start
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {
        "tokens_per_s": a.steps * tokens_per_step / seconds,
        "timed_steps": a.steps, "timed_seconds": seconds, "rows_full": rows_full,
        "all_steps_tokens_per_s": total * tokens_per_step / out.metrics["train_runtime"],
        "trainable_params": trainable, "total_params": sum(p.numel() for p in trainer.model.parameters()),
        "final_loss": out.metrics.get("train_loss"), **peaks,
        "settings": (f"{_dtypes(cuda, a.method)}, micro-batch {micro} x accum {a.batch_size // micro} of {a.seq_len} "
                     f"(bfd packing + padding-free), {attn}, grad ckpt {'on' if a.grad_ckpt else 'off'}, "
                     f"{getattr(args.optim, 'value', args.optim)} (TRL default)"),
    }


def worker(a: argparse.Namespace) -> None:
    if a.worker == "build":
        build_model_folder(a.model, Path(a.model_dir), on_gpu=a.on_gpu)
        print("RESULT {}", flush=True)
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    res = run_tunesmith(a) if a.worker == "tunesmith" else run_trl(a)
    res["wall_s"] = time.perf_counter() - start
    res["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------- driver


def launch(worker_name: str, args: list[str], timeout: float) -> dict:
    """One worker process; its RESULT line, or {"error": ...} so the other runs still go ahead."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker_name, *args]
    env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {proc.returncode}: {last[:300]}"}
    return json.loads(lines[-1][len("RESULT "):])


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=["1b", "8b"], default=["1b", "8b"])
    p.add_argument("--methods", nargs="+", choices=["lora", "full"], default=["lora", "full"])
    p.add_argument("--tools", nargs="+", choices=["tunesmith", "trl"], default=None,
                   help="default: both (with --smoke: tunesmith, plus TRL when it is installed)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 10; --smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before them (default 3; --smoke 1)")
    p.add_argument("--seq-len", type=int, default=None, help="packed row length (default 2048; --smoke 128)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"packed rows per optimizer step (default {DEFAULT_BATCH})")
    p.add_argument("--attn", default="default",
                   help="default: tunesmith's per-document attention, TRL's sdpa; or an attn_implementation for "
                        "both tools (sdpa, flash_attention_2, eager)")
    p.add_argument("--trl-micro-batch", type=int, default=None,
                   help="TRL rows per forward (default: 1 with sdpa/eager, --batch-size with flash attention)")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                   help="the device's dense bf16 peak for MFU (default 989: H100/H200 SXM)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny Llama on the CPU (or GPU), 2 steps: checks the script, not the numbers")
    p.add_argument("--timeout", type=float, default=480,
                   help="seconds per run (default 480: a device command may run 600 s at most)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (models, data, run folders)")
    # Worker-only arguments.
    for name in ("--worker", "--model", "--method", "--model-dir", "--data-dir", "--work"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--grad-ckpt", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--on-gpu", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not a.smoke:
        print(f"gpu_sft.py: {NO_GPU_MESSAGE}", file=sys.stderr)
        raise SystemExit(2)
    trl_installed = importlib.util.find_spec("trl") is not None
    if a.tools is None:
        a.tools = ["tunesmith", "trl"] if trl_installed or not a.smoke else ["tunesmith"]
    if "trl" in a.tools and not trl_installed:
        raise SystemExit("TRL is not installed: pip install -e '.[bench]' (or pass --tools tunesmith)")
    models = ["smoke"] if a.smoke else a.models
    steps = a.steps if a.steps is not None else (2 if a.smoke else 10)
    warmup = a.warmup if a.warmup is not None else (1 if a.smoke else 3)
    seq_len = a.seq_len or (128 if a.smoke else 2048)
    min_doc = min(16 if a.smoke else MIN_DOC, seq_len)
    if steps < 1 or warmup < 0 or seq_len & (seq_len - 1):
        raise SystemExit("--steps must be >= 1, --warmup >= 0, and --seq-len a power of two")
    peak_flops = a.peak_tflops * 1e12

    work = Path(tempfile.mkdtemp(prefix="tunesmith-gpu-sft-"))
    # No CUDA calls here beyond is_available(): a context in this process would hold GPU memory
    # while the workers run. The workers report the device.
    print(f"work folder {work}; {warmup} warmup + {steps} timed steps of {seq_len} tokens x batch; "
          f"tools {', '.join(a.tools)}", flush=True)
    if a.attn.startswith("flash") and "tunesmith" in a.tools:
        # transformers' flash-attention path finds packed documents from position_ids only for
        # a batch of one row; tunesmith's packed batches of several rows then attend across
        # documents (cheaper than the block-diagonal masks of the sdpa runs, and not the same
        # computation as TRL's padding-free batches).
        print("warning: with flash attention, tunesmith's packed rows (batch > 1) attend across documents",
              file=sys.stderr)
    results: dict[str, dict] = {}
    try:
        for model in models:
            batch = a.batch_size or DEFAULT_BATCH[model]
            model_dir, data_dir = work / f"model-{model}", work / f"data-{model}"
            data_dir.mkdir(parents=True)
            t0 = time.perf_counter()
            built = launch("build", ["--model", model, "--model-dir", str(model_dir), *(["--on-gpu"] if cuda else [])],
                           a.timeout)
            if "error" in built:
                results.update({f"{model}/{m}": {"error": "model build failed: " + built["error"]} for m in a.methods})
                continue
            data = write_data(data_dir, (warmup + steps) * batch, seq_len, SHAPES[model]["vocab_size"], min_doc)
            print(f"{model}: model and {data['documents']} documents ({data['tokens']} tokens) ready in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            for method in a.methods:
                dense, attention = flops_per_token(model, method, data["attn_len"])
                common = ["--model", model, "--method", method, "--model-dir", str(model_dir), "--data-dir",
                          str(data_dir), "--work", str(work), "--steps", str(steps), "--warmup", str(warmup),
                          "--seq-len", str(seq_len), "--batch-size", str(batch), "--attn", a.attn,
                          *(["--grad-ckpt"] if GRAD_CKPT[model] else []),
                          *(["--trl-micro-batch", str(a.trl_micro_batch)] if a.trl_micro_batch else [])]
                entry: dict[str, Any] = {"flops_per_token": dense, "attention_flops_per_token": attention,
                                         "batch": batch, "seq_len": seq_len, "grad_ckpt": GRAD_CKPT[model]}
                for tool in a.tools:
                    print(f"running {tool} {model} {method} ...", flush=True)
                    r = launch(tool, common, a.timeout)
                    tps = r.get("tokens_per_s")
                    r["mfu"] = tps * dense / peak_flops if tps else None
                    r["mfu_with_attention"] = tps * (dense + attention) / peak_flops if tps else None
                    entry[tool] = r
                    report_run({"run": f"{model}/{method}", "tool": tool, **r})
                ours, theirs = entry.get("tunesmith", {}), entry.get("trl", {})
                entry["tokens_per_s_ratio"] = _ratio(ours.get("tokens_per_s"), theirs.get("tokens_per_s"))
                entry["peak_gpu_mem_ratio"] = _ratio(ours.get("peak_gpu_mem_mb"), theirs.get("peak_gpu_mem_mb"))
                results[f"{model}/{method}"] = entry
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'run':18} {'tool':10} {'tokens/s':>10} {'MFU':>6} {'MFU+attn':>8} {'peak GPU MB':>12} "
          f"{'peak RSS MB':>12}  settings")
    for key, entry in results.items():
        for tool in a.tools:
            r = entry.get(tool)
            if r is None:
                print(f"{key:18} {tool:10} {'-':>10}  {entry.get('error', '')}")
                continue
            if "error" in r:
                print(f"{key:18} {tool:10} {'failed':>10}  {r['error']}")
                continue
            print(f"{key:18} {tool:10} {r['tokens_per_s']:10.0f} {100 * r['mfu']:5.1f}% "
                  f"{100 * r['mfu_with_attention']:7.1f}% {_fmt(r['peak_gpu_mem_mb'], '12.0f')} "
                  f"{r['peak_rss_mb']:12.0f}  {r['settings']}")
        if entry.get("tokens_per_s_ratio") is not None:
            memory = entry["peak_gpu_mem_ratio"]
            print(f"{key:18} {'ratio':10} {entry['tokens_per_s_ratio']:9.2f}x tunesmith / TRL tokens/s"
                  + (f", {memory:.2f}x peak GPU memory" if memory is not None else ""))
    print(f"MFU: {FLOPS_FORMULA}; peak {a.peak_tflops:g} TFLOP/s")

    headline = results.get("1b/lora", {})
    ratio = headline.get("tokens_per_s_ratio")
    mfu = headline.get("tunesmith", {}).get("mfu")
    summary = {
        "runs": results,
        "targets": {
            "1b_lora_tokens_per_s_ratio": {"target": ">= 1.5", "value": ratio,
                                           "pass": None if ratio is None else ratio >= 1.5},
            "1b_lora_tunesmith_mfu": {"target": ">= 0.40", "value": mfu, "pass": None if mfu is None else mfu >= 0.40},
        },
        "flops_formula": FLOPS_FORMULA, "peak_flops": peak_flops,
        "steps": steps, "warmup": warmup, "seq_len": seq_len, "attn": a.attn, "smoke": a.smoke, "tools": a.tools,
        "timing": ("tokens/s over the timed steps only (warmup excluded); tunesmith from metrics.jsonl per-step "
                   "records, TRL from synchronised callback timestamps"),
    }
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_sft.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


def report_run(record: dict) -> None:
    """One finished run, at once: on stdout and, when $OUT is set, appended to $OUT/gpu_sft_runs.jsonl."""
    line = json.dumps(record)
    print("RUN " + line, flush=True)
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "gpu_sft_runs.jsonl", "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
