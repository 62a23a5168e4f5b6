# Two entry points, both from a fresh clone:
#   make demo   set up .venv, synthesise the embedded abdomen data, run the main job end to end
#   make test   set up .venv and run the default test suite (CPU, no GPU needed)

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo-out

.PHONY: setup demo test test-all clean

$(STAMP): pyproject.toml setup.py $(wildcard src/pddnet/backends/native/*.c src/pddnet/backends/native/*.h src/pddnet/backends/native/*.inc)
	$(PYTHON) -c 'import sys; assert (3, 10) <= sys.version_info[:2] <= (3, 12), "pddnet needs Python 3.10-3.12, got " + sys.version'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet 'torch==2.13.0'
	$(BIN)/python -m pip install --quiet -e '.[train,report,dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/pddnet demo --out $(DEMO_OUT) --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
