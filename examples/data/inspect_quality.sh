#!/usr/bin/env bash
# Data quality report on SST-2: duplicates and near-duplicates, leakage into the dev set, outliers,
# languages, label balance; an HTML report with plots and a cleaned copy with its dataset card.
#   bash examples/data/inspect_quality.sh      (needs ../shared/data and pip install 'tunesmith[data]')
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA="${DATA:-../shared/data/sst2}"
mkdir -p runs/data
rm -rf runs/data/sst2_clean runs/data/sst2_report.html
tunesmith data inspect "$DATA/train.tsv" --against "$DATA/dev.tsv" \
  --html runs/data/sst2_report.html --write-clean runs/data/sst2_clean
# The cleaned copy is a normal training file:
tunesmith data inspect runs/data/sst2_clean/data.jsonl
