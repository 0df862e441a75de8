# Quick start: `make demo` runs the main job, `make test` the tests. Both create .venv on first use.
# `make docs` builds the documentation (Sphinx) offline into docs/_build/html.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test bench lint docs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The CPU build of torch goes in first, so that nothing later pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test,lm-eval,docs]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pyro_moe demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# glibc returns large freed blocks to the OS and page-faults them back on every big temporary
# tensor; these settings keep them (PyTorch's CPU tuning guides advise jemalloc/tcmalloc instead).
BENCH_MALLOC := MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_TOP_PAD_=1073741824

bench: $(STAMP)
	$(BENCH_MALLOC) $(BIN)/python benchmarks/bench_routing.py
	$(BENCH_MALLOC) $(BIN)/python benchmarks/bench_generation.py
	$(BENCH_MALLOC) $(BIN)/python benchmarks/bench_local_reparameterization.py
	$(BENCH_MALLOC) $(BIN)/python benchmarks/bench_svi.py
	$(BENCH_MALLOC) $(BIN)/python benchmarks/bench_laplace.py
	$(BENCH_MALLOC) $(BIN)/python benchmarks/bench_distributed.py
	$(BENCH_MALLOC) OMP_NUM_THREADS=2 $(BIN)/python benchmarks/bench_scale.py --threads 2

# -W: a warning (a broken reference, a docstring Sphinx cannot read) fails the build, as in tests/test_docs.py.
docs: $(STAMP)
	$(BIN)/python -m sphinx -b html -W --keep-going -q docs docs/_build/html
	@echo "docs/_build/html/index.html"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
