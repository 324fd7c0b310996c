# One-command setup: `make test` and `make demo` build .venv from scratch where missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_venv.sh
	PY=$(PY) bash scripts/setup_venv.sh $(VENV)
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest -q -x --durations=15

test-fast: venv
	$(BIN)/python -m pytest -q -x -m "not slow"

demo: venv
	$(BIN)/python -m rl.demo

clean:
	rm -rf $(VENV)
