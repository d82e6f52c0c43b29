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

.PHONY: demo test lint bench clean bytecode

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# The editable install leaves the project's own modules uncompiled, and with PYTHONDONTWRITEBYTECODE
# set (as on these machines and in the image) every process would compile them again: 0.2 s of each
# worker's start-up. The image's wheel install compiles them; so does this (only what changed).
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q yibao streams schemas sinks

demo: $(STAMP) bytecode
	$(BIN)/yibao demo --events $(DEMO_EVENTS)

test: $(STAMP) bytecode
	bash .ci/system-deps.sh
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/yibao schemas check
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --durations=20

bench: $(STAMP) bytecode
	bash .ci/system-deps.sh
	$(BIN)/yibao bench

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
	find yibao streams schemas sinks -name __pycache__ -type d -prune -exec rm -rf {} +
