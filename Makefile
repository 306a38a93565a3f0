# The README's commands. `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: demo test setup lint format clean

$(BIN)/sft: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first: the CPU build on this kind of machine (an unpinned torch would pull a multi-GB CUDA build)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(BIN)/sft

setup: $(BIN)/sft

demo: setup ## the whole pipeline on the embedded tiny default, offline
	$(BIN)/sft train configs/tiny.yaml

# One pytest-xdist worker per core, each running whole test files (module fixtures train once), the files with the
# most end-to-end tests first (tests/conftest.py); `make test PYTEST_WORKERS=0` runs them in this one process.
PYTEST_WORKERS ?= auto

test: setup ## the whole offline CPU test suite
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: setup
	$(BIN)/ruff check src tests pipelines
	$(BIN)/ruff format --check src tests pipelines

format: setup
	$(BIN)/ruff format src tests pipelines
	$(BIN)/ruff check --fix src tests pipelines

clean:
	rm -rf runs models .pytest_cache
