#!/usr/bin/env bash
# Preflight plan: parameters, peak memory split by kind and a speed estimate, before any weight loads.
#   bash examples/plan/plan_smollm2.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
# Estimate only (two small proxies of the run, random weights; about a minute on 2 CPU cores):
tunesmith plan examples/sft/lora_alpaca.yaml
# Would it fit a 16 GB T4? And the real model's measured peak and tokens/s beside the estimate:
tunesmith plan examples/sft/lora_alpaca.yaml --set training.batch_size=4 --gpu T4 --measure --json runs/plan.json
# A distillation run: the teacher is loaded whole beside the 15-block student and shown on its own line.
tunesmith plan examples/distill/smollm2_half_layers.yaml --measure
