#!/usr/bin/env bash
# Two CPU processes (gloo) on one machine: the tested path (tests/test_distributed.py). Each
# process takes every other micro-batch; with training.grad_accum halved the global batch, losses
# and final weights equal a one-process run's.
set -euo pipefail
torchrun --standalone --nproc_per_node 2 -m tunesmith.cli train "${1:-examples/scale/dpo_lora_two_processes.yaml}"
