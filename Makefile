# Two entry points: `make demo` (the main job on the embedded digits data) and `make test`.
# Both create the virtual environment on first use. torch is pinned: an unpinned torch pulls a CUDA build.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.deqkit-installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/deqkit compare --out runs/compare

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs

# Sampled mutation testing of the modules that produce reported numbers (issue 17; see TESTING.md).
# Bounded: MUTANTS sampled with a fixed seed, 2 workers, per-mutant timeout, BUDGET_MIN wall-clock cap.
MUTANTS ?= 120
MUTATION_SEED ?= 0
BUDGET_MIN ?= 45
.PHONY: mutation
mutation: $(STAMP)
	DEQKIT_REQUIRE_ALL=1 $(BIN)/python tools/mutation.py --mutants $(MUTANTS) --seed $(MUTATION_SEED) --jobs 2 --budget-min $(BUDGET_MIN) --report runs/mutation-report.json
