#!/usr/bin/env bash
# Share the quickstart's adapter (with its model card and config) on the Hugging Face Hub.
# --dry-run lists what would go up; drop it (and log in with `hf auth login`) to upload.
set -euo pipefail
test -d runs/quickstart || tunesmith quickstart --output runs/quickstart
tunesmith push runs/quickstart --repo "${HF_USER:-your-name}/smollm2-reviews-lora" --private --dry-run
