#!/usr/bin/env bash
# Preflight plan: parameters, peak memory split by kind and a speed estimate, before any weight loads.
#   bash examples/plan/plan_smollm2.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
# Estimate only (two small proxies of the run, random weights; about a minute on 2 CPU cores):
tunesmith plan examples/sft/lora_alpaca.yaml
# Would it fit a 16 GB T4? And the real model's measured peak and tokens/s beside the estimate:
tunesmith plan examples/sft/lora_alpaca.yaml --set training.batch_size=4 --gpu T4 --measure --json runs/plan.json
