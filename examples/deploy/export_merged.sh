#!/usr/bin/env bash
# Train the quickstart's LoRA run, then export it as a plain transformers model (the adapter
# folded into SmolLM2-135M-Instruct), loadable with no peft and no tunesmith.
set -euo pipefail
tunesmith quickstart --output runs/quickstart
tunesmith export runs/quickstart --format merged --output runs/quickstart-merged
python -c "from transformers import AutoModelForCausalLM as M; print(M.from_pretrained('runs/quickstart-merged').config.architectures)"
