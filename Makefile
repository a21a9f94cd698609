# oneword: `make demo` runs the main job, `make test` the tests. Both install into .venv on first use.
# torch is installed first and on its own: a bare `torch` requirement would pull a multi-GB CUDA build.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
OPEN_CLIP ?= open_clip_torch==3.3.0
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo lint compile lock clean

$(STAMP): pyproject.toml requirements/runtime.lock requirements/dev.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements/dev.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps $(OPEN_CLIP)
	$(BIN)/python -m pip install -q --disable-pip-version-check "setuptools>=77"  # the licence as PEP 639 says it
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

## The whole test suite, slow tests included (the method's proof among them).
test: install
	$(BIN)/python -m pytest -n auto --dist loadfile --no-loadscope-reorder

## While iterating: skip the tests marked slow.
test-fast: install
	$(BIN)/python -m pytest -n auto --dist loadfile --no-loadscope-reorder -m "not slow"

## Train a concept from five pictures, register it, and print where its pictures are.
demo: install
	$(BIN)/oneword demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/oneword compile --check
	$(BIN)/hadolint docker/*.Dockerfile
	$(BIN)/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	PATH="$(CURDIR)/$(BIN):$$PATH" k8s/validate.sh

compile: install
	$(BIN)/oneword compile

lock:
	rm -rf /tmp/oneword-lock && $(PYTHON) -m venv /tmp/oneword-lock
	/tmp/oneword-lock/bin/pip install -q $(TORCH) && /tmp/oneword-lock/bin/pip install -q .
	/tmp/oneword-lock/bin/pip freeze | grep -v -E '^(oneword|torch)( @ |==)' > requirements/runtime.lock.new
	@echo "review requirements/runtime.lock.new, then move it over requirements/runtime.lock"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist src/*.egg-info
