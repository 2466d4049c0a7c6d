# CNP companion: two commands.
#   make reproduce   the default sweep on the embedded benchmark -> runs/reproduce, figures/
#   make test        unit tests + notebooks (nbval, smoke parameters) + reduced claim test
# Both build the virtual environment .venv first when it is missing (make .venv).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.cnp-installed
# generated data and the pretrained backbone are cached here (rebuilt when missing or stale)
export CNP_CACHE ?= $(CURDIR)/cache
export PYTHONHASHSEED := 0

.PHONY: all reproduce test lab clean-cache .venv lint strip-notebooks

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name cnp --display-name "Python (cnp)" >/dev/null
	touch $(STAMP)

.venv: $(STAMP)

reproduce: $(STAMP)
	$(BIN)/python -m cnp.sweep --preset reproduce --out runs/reproduce --figures figures --workers 2

# The notebooks run under nbval in smoke mode: their parameters cells read CNP_SMOKE (tiny sizes),
# CNP_RUNS (where the run directory goes) and CNP_FIGURES (where 06 writes), all set to a
# temporary folder here; 01-05 share one run directory, 06 draws the figures from it. They run
# one after the other on one thread, beside the test suite (their report follows the suite's), so
# that their time fills the cores the suite leaves idle instead of coming after it.
# The test suite runs on PYTEST_WORKERS pytest-xdist workers (each test uses one thread; modules
# that share expensive fixtures stay on one worker, see tests/conftest.py); 0 runs it in-process.
PYTEST_WORKERS ?= 2
NOTEBOOK_TESTS = CNP_SMOKE=1 CNP_RUNS=$$tmp/runs CNP_FIGURES=$$tmp/figures CNP_PROGRESS=0 CNP_THREADS=1 \
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q --nbval-lax --nbval-kernel-name cnp -p no:cacheprovider notebooks

test: $(STAMP)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT || exit 1; \
	{ $(NOTEBOOK_TESTS) >$$tmp/notebooks.log 2>&1; echo $$? >$$tmp/notebooks.rc; } & \
	echo "== tests (the notebooks run beside them; their report follows)"; \
	$(BIN)/python -m pytest -q $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadgroup) tests; \
	rc=$$?; wait; echo "== notebooks (nbval, smoke parameters)"; cat $$tmp/notebooks.log; \
	nb=$$(cat $$tmp/notebooks.rc 2>/dev/null || echo 1); \
	if [ $$rc -ne 0 ] || [ $$nb -ne 0 ]; then echo "make test: FAILED (tests exit $$rc, notebooks exit $$nb)"; exit 1; fi

# Remove outputs from the notebooks before committing them (a test checks they have none).
strip-notebooks: $(STAMP)
	$(BIN)/nbstripout notebooks/*.ipynb

lint: $(STAMP)
	$(BIN)/ruff check .

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks

clean-cache:
	rm -rf cache
