# The two set-up commands in README.md are `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast wan-smoke ablation prefect-up prefect-down clean

$(BIN)/anyflow: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the pinned CPU wheel, so nothing else can pull a CUDA build. --no-compile: byte-compiling every
	# installed module took half the install (-e '.[all]' 53 s -> 27 s); Python compiles the few it imports on first use
	$(BIN)/pip install -q --no-compile torch==2.13.0
	$(BIN)/pip install -q --no-compile -e '.[all]'
	touch $@

install: $(BIN)/anyflow

# Runs the whole toy pipeline through DVC (embedded default: no GPU, no downloads): `anyflow repro --jobs 2` is
# `dvc repro` with independent stages on both cores (each stage is `dvc repro --single-item`; `dvc repro` gives the
# same dvc.lock one stage at a time). The stage commands (`anyflow <stage>`) resolve through the venv's bin.
# Ends with the gate's verdict, its per-NFE table (artifacts/gate/summary.md) and where the previews are — also when
# a stage failed (a failing gate exits 1: export is skipped); the exit status is the runner's.
JOBS ?= 2
demo: install
	@rc=0; PATH="$(abspath $(BIN)):$$PATH" $(BIN)/anyflow repro --jobs $(JOBS) || rc=$$?; echo; \
	if [ $$rc -ne 0 ]; then echo "repro FAILED (exit $$rc): what follows is from the last run of each stage"; fi; \
	if [ -f metrics/gate_sanity.json ]; then $(BIN)/python -c "import json; m = json.load(open('metrics/gate_sanity.json')); \
	print('gate sanity (metrics/gate_sanity.json):', 'PASSED' if m['passed'] else 'FAILED ' + ', '.join(m['failed']))"; fi; \
	if [ -f artifacts/gate/summary.md ]; then echo; cat artifacts/gate/summary.md; echo; \
	echo "Previews: $(abspath artifacts/gate/previews)/grid.{gif,mp4,png} (columns: $$(cat artifacts/gate/previews/columns.txt))"; \
	else echo "no gate summary (artifacts/gate/summary.md): the pipeline stopped before the gate"; fi; \
	exit $$rc

# Two workers (pytest-xdist), a test file per worker at a time; TEST_JOBS=1 runs it in one process.
TEST_JOBS ?= 2
test: install
	$(BIN)/pytest -q -ra -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder --durations=15

test-fast: install
	$(BIN)/pytest -q -m "not slow" -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder

# The wan-1.3b profile end to end on the random-weight wan-mini fixture (Wan2.1-T2V-1.3B-Diffusers' layout), in a
# temporary workspace, on CPUs: dvc repro (teacher check ... export, bf16 stage 1), promote, pull, generate, and the
# FAR student with the profile's 8-chunk partition (README "The Wan path"). WORKDIR=dir keeps the workspace.
wan-smoke: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/anyflow wan-smoke $(if $(WORKDIR),--workdir $(WORKDIR))

# Issue [I]'s per-change ablation (ablation/dvc.yaml, README "Ablation"): each fix of the training math reverted on its
# own and all together, trained and scored by the gate's function against the root pipeline's teacher rows; brings
# the root stages it reads up to date first. ~45 min on 2 cores after `make demo` (12 variants).
ablation: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/anyflow repro --jobs $(JOBS) ablation/dvc.yaml
	@cat artifacts/ablation/table.md

# A local Prefect stack (docs/orchestration.md): server on 127.0.0.1:4200, work pools, every deployment of
# deploy/prefect.yaml (verified registered), a worker on anyflow-local. `make prefect-down` stops server and worker.
prefect-up: install
	ANYFLOW_VENV="$(abspath $(VENV))" deploy/local.sh up

prefect-down:
	ANYFLOW_VENV="$(abspath $(VENV))" deploy/local.sh stop

clean:
	rm -rf artifacts metrics/*.json plots/*.csv
