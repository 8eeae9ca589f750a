# What a person runs. `make run` and `make test` are README's two commands: each installs
# what it needs into .venv (pinned by constraints.txt) and then does its job.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-deps run test test-fast lint format bench clean

$(STAMP): pyproject.toml constraints.txt client/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[worker,dev]" -e ./client
	touch $(STAMP)

install: $(STAMP)

# The API on 127.0.0.1:8000 and one worker, on the embedded default (SQLite + SQLite broker).
run: $(STAMP)
	$(BIN)/trainsvc up --host 127.0.0.1 --port 8000

# Tools some tests need (docker-compose, chromium): installed with apt-get when running as root
# (CI); elsewhere a note, and those tests skip.
system-deps:
	@.ci/setup-system

# The whole suite, against the PostgreSQL and Redis on 127.0.0.1 (CI=true: they must answer).
test: $(STAMP) system-deps
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q

# ruff, mypy (strict) and the import contracts in pyproject.toml (which layer may import which).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
