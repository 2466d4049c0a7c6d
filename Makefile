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

.PHONY: all reproduce test lab clean-cache .venv lint

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name cnp --display-name "Python (cnp)" >/dev/null
	touch $(STAMP)

.venv: $(STAMP)

reproduce: $(STAMP)
	$(BIN)/python -m cnp.sweep --preset reproduce --out runs/reproduce --figures figures

test: $(STAMP)
	$(BIN)/python -m pytest -q tests
	$(BIN)/python -m pytest -q --nbval-lax --nbval-kernel-name cnp --nbval-current-env -p no:cacheprovider notebooks/smoke

lint: $(STAMP)
	$(BIN)/ruff check .

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks

clean-cache:
	rm -rf cache
