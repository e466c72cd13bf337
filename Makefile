# scaletrain: `make demo` and `make test` each create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export WANDB_MODE ?= offline
export WANDB_SILENT := true
export DS_BUILD_OPS := 0

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# torch first, pinned: a bare `torch` requirement would pull GBs of CUDA wheels.
	@# GPU users: `make setup TORCH_SPEC=` keeps the torch already in the venv.
	$(if $(TORCH_SPEC),$(PIP) install -q "$(TORCH_SPEC)")
	$(PIP) install -q -e ".[test,slurm]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m scripts_demo 2>/dev/null || bash bench/../scripts/demo.sh

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) outputs runs .pytest_cache
