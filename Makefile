# Two entry points for a fresh machine: `make bench` and `make test`.
# torch is installed first and pinned, so pip takes the CPU wheel from its configured
# wheel folder and never resolves a CUDA build. GPU users: see README "Installing on a GPU".
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: venv bench test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test,hf]" "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check --no-deps "timm>=1.0"
	touch $(STAMP)

venv: $(STAMP)

bench: $(STAMP)
	$(BIN)/attnkit bench --suite default --out bench-results

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) bench-results .pytest_cache
