#!/bin/sh
# What a lent GPU machine runs, from the repository root, through the device tool with
# carry [".gpu-wheels"] (made here by `python benchmarks/gpu_wheels.py`): the carried wheels go
# beside the image's CUDA torch, then benchmarks/gpu_sft.py runs with the given arguments and
# writes each finished run to $OUT/gpu_sft_runs.jsonl as it ends.
#   sh benchmarks/gpu_run.sh --models 1b              # the target runs, ~4 min
#   sh benchmarks/gpu_run.sh --models 8b --methods lora
set -e
PY="${PYTHON:-python3}"  # the image's Python (3.12, CUDA torch); PYTHON=... to try the script elsewhere
if [ ! -d .gpu-wheels ]; then
    echo "gpu_run.sh: no .gpu-wheels folder: run python benchmarks/gpu_wheels.py here and carry it" >&2
    exit 2
fi
"$PY" -m pip install -q --no-index --no-deps --target /tmp/tunesmith-site .gpu-wheels/*.whl
export PYTHONPATH="$PWD/src:/tmp/tunesmith-site"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers, peft, trl, tunesmith; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| peft', peft.__version__, '| trl', trl.__version__)"
exec "$PY" benchmarks/gpu_sft.py "$@"
