# Two commands on a fresh machine: `make demo` and `make test`.
# Each installs what is missing first: .venv/ (torch pinned in pyproject.toml) and
# Debian's dataset-fashion-mnist.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CMAKE := /usr/bin/cmake
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_OUT ?= runs/demo

.PHONY: install demo test test-compat bench clean

install: $(STAMP) $(FMNIST) $(CMAKE)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev,export]'
	touch $@

$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

# firmware_sim's build (CMake and a C compiler)
$(CMAKE):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq cmake gcc

# The CPU-sized model on real Fashion-MNIST, streamed within a 64 MB training budget
# (docs/RESULTS.md has the figures; streaming does not change them), then its Best-Pred
# early exit exported to ONNX, checked against PyTorch and timed (docs/DEPLOY.md), and run
# on firmware_sim, the C runtime, within 256 KB of RAM (docs/FIRMWARE.md).
demo: install
	$(PY) -m asge_edge train --dataset fashion-mnist --model vgg8 --width 0.25 --epochs 3 --memory-budget 64MB --out $(DEMO_OUT) --force
	$(PY) -m asge_edge export $(DEMO_OUT) --early-exit
	$(PY) -m asge_edge simulate $(DEMO_OUT) --ram 256KB --samples 1000

test: install
	$(PY) -m pytest -q

# The suite on the oldest torch the code supports: 2.11, the GPU machines' version (with its
# torchvision, 0.26), in a venv of its own; the other dependencies are pyproject.toml's.
COMPAT_VENV := .venv-torch2.11
COMPAT_TORCH := torch==2.11.0 torchvision==0.26.0
COMPAT_DEPS = $(shell $(PYTHON) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
	print(' '.join([d for d in p['dependencies'] if not d.startswith('torch')] + p['optional-dependencies']['export'] + p['optional-dependencies']['dev']))")
test-compat: $(FMNIST) $(CMAKE)
	[ -x $(COMPAT_VENV)/bin/python ] || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install -q $(COMPAT_TORCH) $(COMPAT_DEPS)
	PYTHONPATH=$(CURDIR) $(COMPAT_VENV)/bin/python -m pytest -q

bench: install
	$(PY) bench/step_time.py

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info .pytest_cache
