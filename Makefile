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
# temporary folder here; 01-05 share one run directory, 06 draws the figures from it.
# The test suite runs on PYTEST_WORKERS pytest-xdist workers (each test uses one thread; modules
# that share expensive fixtures stay on one worker, see tests/conftest.py); 0 runs it in-process.
PYTEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadgroup) tests
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	CNP_SMOKE=1 CNP_RUNS=$$tmp/runs CNP_FIGURES=$$tmp/figures CNP_PROGRESS=0 CNP_THREADS=1 OMP_NUM_THREADS=1 \
	$(BIN)/python -m pytest -q --nbval-lax --nbval-kernel-name cnp -p no:cacheprovider notebooks

# Remove outputs from the notebooks before committing them (a test checks they have none).
strip-notebooks: $(STAMP)
	$(BIN)/nbstripout notebooks/*.ipynb

lint: $(STAMP)
	$(BIN)/ruff check .

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks

clean-cache:
	rm -rf cache
