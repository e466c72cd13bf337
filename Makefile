# scaletrain: `make demo` and `make test` each create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export WANDB_MODE ?= offline
export WANDB_SILENT := true
export DS_BUILD_OPS := 0
# DeepSpeed's JIT-built ops live with this venv: in the shared ~/.cache/torch_extensions, a second
# checkout's venv rebuilds the op (its build file names the venv's paths) and the next run of the
# first rebuilds it again, inside a run (~25 s of compiler, and a compiler in a measured peak).
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: setup setup-offline wheelhouse demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# torch first, pinned: a bare `torch` requirement would pull GBs of CUDA wheels.
	@# GPU users: `make setup TORCH_SPEC=` keeps the torch already in the venv.
	$(if $(TORCH_SPEC),$(PIP) install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)))
	$(PIP) install -q -e ".[test,slurm]"
	@# DeepSpeed JIT-builds its CPU shared-memory comm op at the first engine start; build it once
	@# here so that runs (and two ranks racing for its build lock) do not pay for it later.
	-$(PY) -c "from deepspeed.accelerator import get_accelerator as g; b = g().create_op_builder('ShareMemCommBuilder'); b and b.load()" >/dev/null 2>&1
	touch $@

setup: $(VENV)/.installed

# Air-gapped clusters (README): wheels of scaletrain and every runtime dependency except torch and
# its CUDA libraries, for the node's Python (PYVER) and platform; carry the folder to the node.
PYVER ?= $(shell $(PYTHON) -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PLATFORM ?= manylinux_2_28_x86_64
WHEELHOUSE ?= wheelhouse
wheelhouse: setup
	$(PY) scripts/wheelhouse.py --out $(WHEELHOUSE) --python-version $(PYVER) --platform $(PLATFORM)

# On the node, no network: install into the environment of PYTHON, which already has its torch;
# the constraint pins that torch, so pip can neither replace nor upgrade it.
setup-offline:
	@test -d "$(WHEELHOUSE)" || { echo "error: WHEELHOUSE=$(WHEELHOUSE) is not a folder: make wheelhouse first"; exit 2; }
	@$(PYTHON) -c "import torch" 2>/dev/null || { echo "error: $(PYTHON) has no torch: install the site's torch first (or point PYTHON at its environment)"; exit 2; }
	pin=$$(mktemp) && $(PYTHON) -c "import torch; print('torch==' + torch.__version__)" > $$pin && \
	$(PYTHON) -m pip install --no-index --find-links $(WHEELHOUSE) --only-binary=:all: -c $$pin scaletrain; \
	rc=$$?; rm -f $$pin; exit $$rc
	cd / && $(PYTHON) -c "import torch, train.loop as t; print('scaletrain installed offline on torch', torch.__version__, 'at', t.__file__)"

TORCHRUN := $(VENV)/bin/torchrun --standalone --nproc_per_node 2
DEMO_DIR := runs/demo
# The demo trains on 2 ranks: on 2 GPUs where the machine has them, else on 2 CPU ranks (one GPU
# cannot hold two ranks: train/dist.py refuses that before any process group starts).
DEMO_GPUS = $(shell $(PY) -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
DEMO_DEVICE = $(if $(filter-out 0 1,$(DEMO_GPUS)),cuda,cpu)

# The main job on an embedded default: prepare a real corpus (this Python's stdlib sources),
# train on 2 ranks under ZeRO-3, interrupt it (STOP file = what SIGTERM/SIGUSR1 do), run the
# same command again (it resumes from checkpoints/latest), export offline, plot, and let the
# exported model continue a Python prompt through transformers.
DEMO_LAST := $(DEMO_DIR)/checkpoints/step_00000200
demo: setup
	$(PY) -m data_pipeline.prepare shard.max_bytes=1000000
	rm -rf $(DEMO_DIR)
	@echo "== 2 ranks on $(DEMO_DEVICE) (this machine has $(DEMO_GPUS) GPU(s)$(if $(filter cpu,$(DEMO_DEVICE)),: fewer than 2 so CPU ranks))"
	@echo "== 1/5 train; interrupted once step 100 is logged"
	( until grep -qs '"step": 100,' $(DEMO_DIR)/metrics.jsonl; do sleep 0.2; done; touch $(DEMO_DIR)/STOP ) &
	$(TORCHRUN) -m train experiment=demo trainer.device=$(DEMO_DEVICE)
	@echo "== 2/5 the same command again: resumes from $$(cat $(DEMO_DIR)/checkpoints/latest)"
	$(TORCHRUN) -m train experiment=demo trainer.device=$(DEMO_DEVICE)
	@echo "== 3/5 offline export of the last checkpoint, and its integrity check"
	$(PY) -m train.export checkpoint=$(DEMO_LAST) out=$(DEMO_DIR)/export-offline
	$(PY) -m train.export verify=$(DEMO_DIR)/export-offline
	@echo "== 4/5 plots and summary"
	$(PY) -m train.report $(DEMO_DIR)
	@grep -E '^\| (start -> end|resumed) ' $(DEMO_DIR)/report/summary.md
	@echo "== 5/5 the exported model continues a prompt (transformers, greedy)"
	$(PY) -m train.sample $(DEMO_DIR)/exports/step_00000200 --prompt 'def main('
	@echo "done: $(DEMO_DIR)/exports/step_00000200 (HF + GGUF), $(DEMO_DIR)/report/summary.md, W&B offline files in $(DEMO_DIR)/wandb"

# pytest-xdist: one worker per core, whole files per worker (tests/conftest.py keeps the files that
# share a SLURM cluster on one worker and hands the longest out first). A third worker on 2 cores was
# slower (20.8 min against 17.3) and overloaded the timing of the kill/resume tests.
# WORKERS=0 runs everything in this process, one test at a time.
WORKERS ?= 2
XDIST = $(if $(filter-out 0,$(WORKERS)),-n $(WORKERS) --dist loadfile)
test: setup lint
	$(PY) -m pytest -q $(XDIST) --durations=25 tests

# The unit tier only (in-process, no subprocesses): the edit-test loop, under 3 minutes on 2 cores
# (51 s measured, one process; two xdist workers took 85 s: each imports torch and transformers again).
test-fast: setup
	$(PY) -m pytest -q tests/unit

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) outputs runs .pytest_cache
