# Two entry points for a fresh machine: `make demo` and `make test`. Both set up what they need.
PYTHON ?= python3
# test files run in this many processes (pytest-xdist, one file per process at a time): most of the
# suite waits on brokers, servers and worker processes, so 2 halves the wall time even on 2 cores
TEST_WORKERS ?= 2
# settlements `make demo` generates (the journey of it runs fewer: the suite is near its time budget)
DEMO_EVENTS ?= 20000
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/yibao demo --events $(DEMO_EVENTS)

test: $(STAMP)
	bash .ci/system-deps.sh
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/yibao schemas check
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --durations=20

bench: $(STAMP)
	bash .ci/system-deps.sh
	$(BIN)/yibao bench

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
