# Set-up on a fresh machine needs only python3 and make:
#   make demo   - runs the main job (creates .venv on first use)
#   make test   - runs the whole test suite (creates .venv on first use)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo pilot test lint format clean faults faults-full bench bench-full

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edge-agent demo

# a short pilot on the example line, then its report: the fit against the known truth (docs/pilot.md)
pilot: $(STAMP)
	$(BIN)/python -m simulators.pilot $(PILOT_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# the fault suite: faults injected while the line runs, a table of what was lost or doubled
faults: $(STAMP)
	$(BIN)/python -m simulators.faults

faults-full: $(STAMP)
	$(BIN)/python -m simulators.faults --full --json faults-full.json

# benchmarks against the raw stack, as ratios (docs/benchmarks.md; needs mosquitto)
bench: $(STAMP)
	$(BIN)/python -m bench --quick --json bench-quick.json

bench-full: $(STAMP)
	$(BIN)/python -m bench --full --json bench-full.json --plots bench-plots

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
