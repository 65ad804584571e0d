#!/usr/bin/env bash
# Talk to the quickstart's tuned model in the terminal (streaming; /reset, /system TEXT, /exit).
set -euo pipefail
test -d runs/quickstart || tunesmith quickstart --output runs/quickstart
tunesmith chat runs/quickstart --temperature 0 --max-tokens 64
