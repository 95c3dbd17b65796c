# Every target bootstraps .venv (created if missing, reinstalled when setup.py or pyproject.toml
# changed) and installs the package with TensorFlow (CPU) and the test tools.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTHON ?= python3
# The real CIFAR-10 images, when the shared folder is beside the checkout; otherwise TFDS.
DATA_DIR ?= $(firstword $(wildcard ../shared/data))
DEMO_DIR ?= workdirs/quickstart

.PHONY: venv test test-all demo lint clean

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[tf,test]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# shellcheck checks launch/*.sh; installed from Debian's packages when possible, else that test skips.
.PHONY: shellcheck
shellcheck:
	@command -v shellcheck >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq shellcheck) >/dev/null 2>&1 \
	  || echo "shellcheck could not be installed: its test will be skipped"; }

test: $(STAMP) shellcheck lint
	$(PY) -m pytest -q tests

# Slow tests too (multi-process, longer training).
test-all: $(STAMP) shellcheck lint
	$(PY) -m pytest -q -m '' tests

demo: $(STAMP)
	$(PY) -m dks_jax.main --config=configs/quickstart.py --workdir=$(DEMO_DIR) \
	  $(if $(DATA_DIR),--config.data_dir=$(DATA_DIR))

clean:
	rm -rf $(VENV) workdirs
