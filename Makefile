# Two commands on a fresh machine:
#   make train   set up .venv and .venv-vllm and run DASH on the embedded defaults (SmolLM2-135M, arithmetic, CPU)
#   make test    set up .venv and run the test suite (CI runs this)
# For development: make test-fast (unit and stage tests without the real model end to end, ~2 min);
#   make lint (ruff check, as CI runs it); make format (ruff's fixes and formatter, on demand)
# The vLLM sampler's environment (sample.backend: vllm): make vllm (CPU) | make vllm VLLM=gpu
VENV  ?= .venv
PY    := $(VENV)/bin/python
# The CPU build lies on these machines' disk; on a GPU machine: make TORCH=torch==2.13.0 (or your CUDA build)
TORCH ?= torch==2.13.0
# vLLM runs in an environment of its own (requirements/vllm-*.txt say why; docs/vllm.md)
VLLM      ?= cpu
VLLM_VENV ?= .venv-vllm
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup vllm train train-hf test test-fast lint format layers clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: requirements/vllm-$(VLLM).txt
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet -r requirements/vllm-$(VLLM).txt
	@# the registry's torchvision/torchaudio/torchcodec do not match torch 2.13.0+cpu (their
	@# import fails) and vLLM does not need them for text models
	if [ "$(VLLM)" = cpu ]; then $(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec; fi
	$(VLLM_VENV)/bin/python -c "import vllm; print('vLLM', vllm.__version__, 'in $(VLLM_VENV)')"
	touch $@

# the default run samples with vLLM (sample.backend: vllm): its environment is built first
train: setup vllm
	$(VENV)/bin/dashflow run

# the same run with the in-process transformers sampler (no .venv-vllm needed)
train-hf: setup
	$(VENV)/bin/dashflow run --set sample.backend=hf

test: setup vllm
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

# ruff's rules and line length are in pyproject.toml ([tool.ruff]). CI runs the linter; the
# formatter is not enforced yet (it would rewrite 88 files written to 120 columns by hand)
lint: setup
	$(VENV)/bin/ruff check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

layers: setup
	$(VENV)/bin/dashflow layers

clean-venv:
	rm -rf $(VENV) $(VLLM_VENV)
