#!/usr/bin/env bash
# The quickstart's LoRA run as GGUF files for llama.cpp / Ollama (no llama.cpp build needed):
# f16 and q8_0, each loaded back with transformers and compared with the model (tokens, logits,
# greedy generations; the numbers land in export.json and the folder's README).
set -euo pipefail
test -d runs/quickstart || tunesmith quickstart --output runs/quickstart
tunesmith export runs/quickstart --format gguf --type f16 --type q8_0 --output runs/quickstart-gguf
cat runs/quickstart-gguf/Modelfile
# With Ollama installed:  ollama create quickstart -f runs/quickstart-gguf/Modelfile && ollama run quickstart
# With llama.cpp:         llama-cli -m runs/quickstart-gguf/quickstart-q8_0.gguf -cnv
