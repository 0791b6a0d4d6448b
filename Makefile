# Two entry points: `make demo` (the main job on the embedded digits data) and `make test`.
# Both create the virtual environment on first use.
#
# torch is pinned (torch==2.13.0). Which build pip installs depends on the index: the default
# index gives the build PyPI publishes for your platform, which on Linux x86-64 is the CUDA
# build (it pulls in the nvidia-* packages). For the CPU-only build, point pip at PyTorch's CPU
# wheel index (see the install selector on pytorch.org), e.g.
#     make install TORCH_INDEX_URL=<PyTorch's CPU wheel index URL>
# TORCH_INDEX_URL is passed to pip's --index-url for the torch install only.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.deqkit-installed
TORCH_INDEX_URL ?=

.PHONY: demo test install clean docs check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# --overwrite: each `make demo` is one fresh, clean run in runs/compare (an earlier demo's outputs
# there are deleted first; without it deqkit refuses an --out that holds a run).
demo: $(STAMP)
	$(BIN)/deqkit compare --out runs/compare --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs site

# The docs site (API reference from the docstrings, guides whose code the tests run); warnings are errors.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# Static checks: lint, format, types.
check: $(STAMP)
	$(BIN)/ruff check deqkit tests tools
	$(BIN)/ruff format --check deqkit tests tools
	$(BIN)/pyright

# Sampled mutation testing of the modules that produce reported numbers (issue 17; see TESTING.md).
# Bounded: MUTANTS sampled with a fixed seed, 2 workers, per-mutant timeout, BUDGET_MIN wall-clock cap.
MUTANTS ?= 120
MUTATION_SEED ?= 0
BUDGET_MIN ?= 45
.PHONY: mutation
mutation: $(STAMP)
	DEQKIT_REQUIRE_ALL=1 $(BIN)/python tools/mutation.py --mutants $(MUTANTS) --seed $(MUTATION_SEED) --jobs 2 --budget-min $(BUDGET_MIN) --report runs/mutation-report.json
