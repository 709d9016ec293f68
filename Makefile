# gradscope developer commands. `make demo` and `make test` are the two the README promises.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# The CPU build of torch comes from the local wheel; an open-ended `torch` would pull GBs of CUDA packages.
TORCH_CPU := torch==2.13.0

.PHONY: install test demo bench lint clean

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install --quiet $(TORCH_CPU)
	$(PIP) install --quiet -e ".[test]"

test: install
	$(PYTHON) -m pytest -q

demo: install
	$(PYTHON) -m gradscope profile sample_runs/rnn_exploding.py
	$(PYTHON) -m gradscope recommend --plot .gradscope/recommend.png
	$(PYTHON) -m gradscope compare --max-norm auto --seeds 3
	@echo "plots: .gradscope/recommend.png and the loss.png / grad_norm.png in the compare directory above"

bench: install
	$(PYTHON) bench/run.py

lint:
	$(PYTHON) -m ruff check gradscope tests bench sample_runs

clean:
	rm -rf .gradscope build *.egg-info .pytest_cache
