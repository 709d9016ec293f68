# gradscope developer commands. `make demo` and `make test` are the two the README promises.
#
# Which Python: inside an active virtual environment (VIRTUAL_ENV set, or python3 is a venv's) or a
# conda environment (CONDA_PREFIX set), that environment's python3 is used as it is. Anywhere else
# (a system Python, which Debian and Ubuntu mark externally managed) the targets create and use a
# project venv in .venv. `make PYTHON=/path/to/python test` uses that interpreter and nothing else.
BASE_PYTHON ?= python3
VENV := .venv
# The CPU build of torch, installed only where the interpreter has no torch at all. The package itself
# asks for torch>=2.4; never let pip resolve that open requirement with no torch installed, or it
# pulls GBs of CUDA packages.
TORCH_CPU ?= torch==2.13.0

ifeq ($(origin PYTHON),command line)
  PYTHON_DEP :=
else
  IN_ENV := $(shell $(BASE_PYTHON) -c 'import os, sys; print(int(bool(os.environ.get("VIRTUAL_ENV") or os.environ.get("CONDA_PREFIX") or sys.prefix != sys.base_prefix)))' 2>/dev/null)
  ifeq ($(IN_ENV),1)
    PYTHON := $(BASE_PYTHON)
    PYTHON_DEP :=
  else
    PYTHON := $(VENV)/bin/python
    PYTHON_DEP := $(VENV)/bin/python
    # Recipes run as if the venv were activated: `python3` and `gradscope` resolve to it.
    export VIRTUAL_ENV := $(abspath $(VENV))
    export PATH := $(abspath $(VENV))/bin:$(PATH)
  endif
endif
PIP := $(PYTHON) -m pip

.PHONY: install test demo bench lint clean distclean

$(VENV)/bin/python:
	@echo "creating the project venv $(VENV) with $$(command -v $(BASE_PYTHON)) (not inside a venv or conda env)"
	@$(BASE_PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "could not create $(VENV): on Debian/Ubuntu install the venv module (apt install python3-venv), or activate an environment of your own and rerun" >&2; \
	  exit 1; }

install: $(PYTHON_DEP)
	@echo "installing gradscope into $$($(PYTHON) -c 'import sys; print(sys.prefix)')"
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install --quiet $(TORCH_CPU)
	$(PIP) install --quiet -e ".[test]"

test: install
	$(PYTHON) -m pytest -q -n 2  # two workers: most tests wait on subprocesses

demo: install
	$(PYTHON) -m gradscope profile sample_runs/rnn_exploding.py
	$(PYTHON) -m gradscope recommend --plot .gradscope/recommend.png
	$(PYTHON) -m gradscope compare --max-norm auto --seeds 3
	$(PYTHON) -m gradscope report -o .gradscope/report.html
	@echo "plots: .gradscope/recommend.png and the loss.png / grad_norm.png in the compare directory above; every chart: .gradscope/report.html"

bench: install
	$(PYTHON) bench/run.py

lint: $(PYTHON_DEP)
	@$(PYTHON) -m ruff --version >/dev/null 2>&1 || $(PIP) install --quiet "ruff>=0.4"
	$(PYTHON) -m ruff check gradscope tests bench sample_runs

clean:
	rm -rf .gradscope build *.egg-info .pytest_cache

distclean: clean
	rm -rf $(VENV)
