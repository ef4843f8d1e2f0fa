# The two set-up commands in README.md are `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast prefect-up prefect-down clean

$(BIN)/anyflow: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the pinned CPU wheel, so nothing else can pull a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[all]'
	touch $@

install: $(BIN)/anyflow

# Runs the whole toy pipeline through DVC (embedded default: no GPU, no downloads).
# The stage commands (`anyflow <stage>`) resolve through the venv's bin, first on PATH.
demo: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc metrics show

test: install
	$(BIN)/pytest -q -ra

test-fast: install
	$(BIN)/pytest -q -m "not slow"

# A local Prefect stack (docs/orchestration.md): server on 127.0.0.1:4200, work pools, every deployment of
# deploy/prefect.yaml (verified registered), a worker on anyflow-local. `make prefect-down` stops server and worker.
prefect-up: install
	ANYFLOW_VENV="$(abspath $(VENV))" deploy/local.sh up

prefect-down:
	ANYFLOW_VENV="$(abspath $(VENV))" deploy/local.sh stop

clean:
	rm -rf artifacts metrics/*.json plots/*.csv
