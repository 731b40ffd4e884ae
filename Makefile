# The README's two commands are `make demo` and `make test`; both set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= demo_out

# mamba-ssm / causal-conv1d: never try GitHub wheels (no network) and never compile CUDA here;
# all four variables are needed (docs/install.md says what each one stops).
export MAMBA_SKIP_CUDA_BUILD := TRUE
export MAMBA_FORCE_BUILD := TRUE
export CAUSAL_CONV1D_SKIP_CUDA_BUILD := TRUE
export CAUSAL_CONV1D_FORCE_BUILD := TRUE
export HF_HUB_OFFLINE := 1
export RAY_AUTH_MODE := disabled

.PHONY: setup test demo lint lock bench-gpu clean-demo

setup: $(STAMP)

# Re-runs only when a requirements file changes, so a second `make setup` takes seconds.
$(STAMP): requirements/torch.txt requirements/lock.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/torch.txt
	$(PY) -m pip install -q --no-build-isolation -r requirements/lock.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

demo: setup
	OUT=$(OUT) bash scripts/demo.sh

lint: setup
	$(VENV)/bin/ruff check .

# Freeze the resolved stack after changing requirements/base.in.
lock:
	$(PY) -m pip install --no-build-isolation -r requirements/base.in
	$(PY) -m pip freeze --exclude-editable | grep -v -E '^(torch|torchvision)==' > requirements/lock.txt

clean-demo:
	rm -rf $(OUT)
