# Two commands: `make run` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test test-fast lint bench clean

install: $(STAMP)

# llama-cpp-python ships only as source. It is built once, portable (GGML_NATIVE=OFF: AVX2, no AVX-512
# or AMX kernels; a native build on these Xeons segfaults on the first prompt longer than one token), into a
# wheel directory of our own: pip's cache is keyed by the source, not by CMAKE_ARGS, and would hand back a
# wheel built with other flags. The version is read from pyproject.toml so the pin lives in one place.
LLAMA_VERSION := $(shell sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml | head -n 1)
WHEELS := $(HOME)/.cache/callbot-wheels/llama-cpp-python-$(LLAMA_VERSION)-portable

# Reinstall only when the dependency list or this recipe changes.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/python -m pip wheel --quiet --disable-pip-version-check \
		--no-deps --no-cache-dir -w $(WHEELS) llama-cpp-python==$(LLAMA_VERSION)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --find-links $(WHEELS) -e '.[dev]'
	touch $(STAMP)

run: install
	$(BIN)/callbot db upgrade
	$(BIN)/callbot app

# Everything: the real models, the browser, PostgreSQL (CI fails rather than skips when one is missing). The browser
# and model tests run one at a time (each drives chromium and an app, or the model, on both cores: two at once starve
# each other, seen here); the rest then runs on two xdist workers, each with its own PostgreSQL database.
test: install
	$(BIN)/ruff check .
	@$(BIN)/pytest -q -m "browser or model"; first=$$?; \
	$(BIN)/pytest -q -n 2 -m "not browser and not model"; second=$$?; \
	[ $$first -eq 0 ] && [ $$second -eq 0 ]

# While you work: no model, no browser, no subprocess-heavy test, on two workers (each with its own PostgreSQL test
# database), in under 2 minutes. Markers are listed in pyproject.toml.
test-fast: install
	$(BIN)/ruff check .
	$(BIN)/pytest -q -n 2 -m "not model and not browser and not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install
	$(BIN)/python bench/turn_overhead.py
	$(BIN)/python bench/llm_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
