# Every target bootstraps .venv (created if missing, reinstalled when setup.py, pyproject.toml or
# constraints.txt changed) and installs the package with TensorFlow (CPU) and the test tools, at
# the exact versions of constraints.txt. Nothing is installed outside the checkout.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTHON ?= python3
# The real CIFAR-10 images, when the shared folder is beside the checkout; otherwise TFDS.
DATA_DIR ?= $(firstword $(wildcard ../shared/data))
DEMO_DIR ?= workdirs/quickstart

.PHONY: venv torch-env test test-all demo study lint clean clean-torch python-version

python-version:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 11) else 1)' 2>/dev/null || { \
	  echo "dks_jax needs Python 3.11 or newer (JAX 0.10 does); '$(PYTHON)' is $$($(PYTHON) --version 2>&1)." \
	       "Run with PYTHON=/path/to/python3.11 (or newer)."; exit 1; }

$(STAMP): setup.py pyproject.toml constraints.txt | python-version
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[tf,test]'
	touch $(STAMP)

venv: $(STAMP)

# A separate PyTorch (CPU) environment for the speed comparison, with torch and numpy only:
#   make torch-env
#   .venv/bin/python -m dks_jax.tools.benchmark ... --compare_torch --torch_python=.venv-torch/bin/python
# TORCH_SPEC is what pip installs (numpy at the version of constraints.txt beside it). It is looked
# for first where pip is configured to look (its index, find-links such as a folder of local
# wheels: PIP_FIND_LINKS or pip.conf), then on the PyTorch CPU index TORCH_INDEX_URL (the public
# way, as `pip install torch --index-url https://download.pytorch.org/whl/cpu`), added to pip's
# index. Another build: `make torch-env TORCH_SPEC=torch==2.14.1+cpu`; `make clean-torch` first.
TORCH_VENV      ?= .venv-torch
TORCH_SPEC      ?= torch==2.13.0+cpu
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
TORCH_STAMP     := $(TORCH_VENV)/.installed

$(TORCH_STAMP): | python-version
	test -x $(TORCH_VENV)/bin/python || $(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	NUMPY=$$(grep -i '^numpy==' constraints.txt); \
	$(TORCH_VENV)/bin/python -m pip install --quiet '$(TORCH_SPEC)' "$$NUMPY" 2>/dev/null || { \
	  echo "$(TORCH_SPEC) is not where pip looks by default: trying $(TORCH_INDEX_URL) too"; \
	  $(TORCH_VENV)/bin/python -m pip install --quiet --extra-index-url '$(TORCH_INDEX_URL)' \
	    '$(TORCH_SPEC)' "$$NUMPY"; }
	$(TORCH_VENV)/bin/python -c 'import numpy, torch; print("torch", torch.__version__, \
	  "numpy", numpy.__version__, "threads", torch.get_num_threads())'
	touch $(TORCH_STAMP)

torch-env: $(TORCH_STAMP)

# ruff, then the type checker (mypy on dks_jax/, settings in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# The default suite (about 11 minutes on 2 CPU cores); the slowest tests are listed at the end.
test: $(STAMP) lint
	$(PY) -m pytest -q --durations=15 tests

# Slow tests too (multi-process, longer training, the XLA hang reproduction).
test-all: $(STAMP) lint
	$(PY) -m pytest -q --durations=15 -m '' tests

demo: $(STAMP)
	$(PY) -m dks_jax.main --config=configs/quickstart.py --workdir=$(DEMO_DIR) \
	  $(if $(DATA_DIR),--config.data_dir=$(DATA_DIR))

# The CPU evidence study (results/cpu_study/README.md): about 5 hours on 2 cores, resumable.
# STUDY_JOBS runs train at once, one CPU core each.
STUDY_JOBS ?= 2
study: $(STAMP)
	DATA_DIR=$(DATA_DIR) JOBS=$(STUDY_JOBS) results/cpu_study/run.sh

clean-torch:
	rm -rf $(TORCH_VENV)

clean: clean-torch
	rm -rf $(VENV) workdirs
