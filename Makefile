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

.PHONY: venv test test-all demo study lint clean python-version

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

# ruff, then the type checker (mypy on dks_jax/, settings in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# The default suite (about 9 minutes on 2 CPU cores); the slowest tests are listed at the end.
test: $(STAMP) lint
	$(PY) -m pytest -q --durations=15 tests

# Slow tests too (multi-process, longer training, the XLA hang reproduction).
test-all: $(STAMP) lint
	$(PY) -m pytest -q --durations=15 -m '' tests

demo: $(STAMP)
	$(PY) -m dks_jax.main --config=configs/quickstart.py --workdir=$(DEMO_DIR) \
	  $(if $(DATA_DIR),--config.data_dir=$(DATA_DIR))

# The CPU evidence study (results/cpu_study/README.md): about 5 hours on 2 cores, resumable.
study: $(STAMP)
	DATA_DIR=$(DATA_DIR) results/cpu_study/run.sh

clean:
	rm -rf $(VENV) workdirs
