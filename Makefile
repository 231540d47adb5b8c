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

.PHONY: install demo test bench clean

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

bench: install
	$(PY) bench/step_time.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
