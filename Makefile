# Two commands on a fresh machine:
#   make train   set up .venv and run DASH on the embedded defaults (SmolLM2-135M, arithmetic, CPU)
#   make test    set up .venv and run the test suite (CI runs this)
# For development: make test-fast (unit and stage tests without the real model end to end, ~2 min)
VENV  ?= .venv
PY    := $(VENV)/bin/python
# The CPU build lies on these machines' disk; on a GPU machine: make TORCH=torch==2.13.0 (or your CUDA build)
TORCH ?= torch==2.13.0
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup train test test-fast layers clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

train: setup
	$(VENV)/bin/dashflow run

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

layers: setup
	$(VENV)/bin/dashflow layers

clean-venv:
	rm -rf $(VENV)
