# One command each: `make train` (the quickstart), `make test` (the whole suite, as CI runs it).
# Both create .venv and install everything on first use. TORCH is the torch requirement to
# install; TORCH_INDEX, when set, the package index it comes from (see the README).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: setup train test test-fast lint gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned, so the dependency resolver never swaps in another build
	$(BIN)/pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

train: setup
	$(BIN)/dist-train train configs/quickstart.yaml $(ARGS)

# Every test, on all cores (an idle core steals queued tests from a busy one); the 15
# slowest are listed at the end.
test: lint
	$(BIN)/pytest -n auto --dist worksteal --durations=15 $(ARGS)

# The contributor's inner loop: unit and in-process tests only, no multi-process runs.
test-fast: setup
	$(BIN)/pytest -n auto -m "not slow and not distributed" $(ARGS)

# Style, and the one-way layers of the package (pyproject.toml, [tool.importlinter]).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# On a machine with one NVIDIA GPU and a CUDA torch build: every CUDA-specific check, one JSON.
gpu-check: setup
	$(BIN)/python -m dist_train.gpu_check --out gpu_check.json $(ARGS)

clean:
	rm -rf $(VENV) runs bench_results gpu_check.json .pytest_cache .import_linter_cache
