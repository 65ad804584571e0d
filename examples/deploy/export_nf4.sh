#!/usr/bin/env bash
# The quickstart's LoRA run folded into its base and stored as bitsandbytes NF4 safetensors, for
# serving on a GPU with plain transformers (`from_pretrained` needs no quantization config).
set -euo pipefail
test -d runs/quickstart || tunesmith quickstart --output runs/quickstart
tunesmith export runs/quickstart --format bnb-4bit --output runs/quickstart-nf4
