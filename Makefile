# raymoe: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url <a CPU wheel index>" where
# the machine has no local torch wheel. Without CUDA the CPU build is installed, never CUDA wheels.
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: demo test setup bench-deps clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test,bench]"
	$(PY) -c "import torch; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m cluster.cli demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

# DeepSpeed for the DeepSpeed-MoE baseline of `python -m benchmarks.compare` (optional: without it
# that row and its test are skipped). Its ops are compiled just in time, never at install.
bench-deps: $(STAMP)
	DS_BUILD_OPS=0 $(PY) -m pip install -q --disable-pip-version-check --no-build-isolation "deepspeed==0.19.8"
	$(PY) -c "import torch; assert torch.__version__.startswith('$(TORCH_VERSION)'), torch.__version__"

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
