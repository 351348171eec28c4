# sessionflow: everyday commands. Everything runs from the project's own .venv (created by `make install`).
# The local stack (Temporal dev server, LiveKit server, LiveAvatar emulator, gateway) is sandbox/ (`python -m sandbox`).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
SOURCES := workflows activities workers starters sandbox config bench tests

.PHONY: install livekit stack lint test chaos cluster cluster-down cluster-test demo screenshots bench record-histories clean

## install: create .venv with $(PYTHON) if missing and install the project with its dev extras
install: $(STAMP)

# Reinstalls only when pyproject.toml changes (or the venv is new), so repeated `make test` stays quick.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $@

## livekit: make sure the LiveKit server binary is built (first time: go install, takes minutes)
livekit: install
	$(PY) -m sandbox livekit

## stack: run the local stack in the foreground until Ctrl-C
stack: install
	$(PY) -m sandbox up

## lint: ruff check and mypy (configured in pyproject.toml; nothing is reformatted), and no `# type: ignore` without a reason
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	@if grep -rnE --include='*.py' '# type: ignore(\[[^]]*\])? *$$' $(SOURCES); then \
		echo 'error: each `# type: ignore[code]` above needs its reason on the same line: `# type: ignore[code]  # why`' >&2; \
		exit 1; \
	fi

## test: lint, then the tests against a local stack started (and stopped) around them; PYTEST_ARGS passes options
test: lint
	$(PY) -m sandbox exec -- $(PY) -m pytest tests $(PYTEST_ARGS)

## chaos: every chaos scenario (long ones too) on a stack of its own (shifted ports); summary in .sessionflow/chaos-summary.md
chaos: install
	$(PY) -m pytest tests/chaos -m "chaos_long or not chaos_long" -s $(PYTEST_ARGS)

## cluster: a multi-service Temporal cluster (v1.29.1 on PostgreSQL 15) in the background; first time builds the server
cluster: install
	$(PY) -m sandbox cluster up

## cluster-down: stop it (the database stays; `python -m sandbox cluster down --wipe` removes it)
cluster-down: install
	$(PY) -m sandbox cluster down

## cluster-test: the failover scenarios on the cluster (started if it is not up), one Temporal process killed at a time
cluster-test: install
	$(PY) -m pytest tests/cluster -m cluster -s $(PYTEST_ARGS)

## demo: run the end-to-end demo
demo: install
	$(PY) -m sandbox demo

## screenshots: the demo session, then the Temporal UI screenshots of docs/support.md (headless Chromium from the OS)
screenshots: install
	$(PY) -m sandbox screenshots

## bench: every benchmark on a local stack (figures and plots go in docs/benchmarks.md); BENCH_ARGS="session_ready --quick" picks
bench: install
	$(PY) -m sandbox exec -- $(PY) -m bench $(BENCH_ARGS)

## record-histories: add the histories replayed by tests/replay (never overwrites; NAMES=... for some)
record-histories: install
	$(PY) -m tests.replay.record $(NAMES)

## clean: stop a stack (and a cluster) left running and remove state, caches and build output (keeps .venv and the LiveKit cache)
clean:
	-@test -x $(PY) && $(PY) -m sandbox down
	-@test -x $(PY) && $(PY) -m sandbox cluster down
	rm -rf .sessionflow .pytest_cache .hypothesis .mypy_cache .ruff_cache build
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
