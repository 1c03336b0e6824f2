# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv, installs raysmith, runs the quickstart (a run and a search)
#   make test   creates .venv, installs raysmith with its test tools, runs the tests
#               (TEST_WORKERS pytest processes, each running whole test modules)
#
# torch goes in first so nothing pulls a second build. The default is the CPU wheel;
# GPU users pick theirs, e.g.
#   make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# Test modules wait on Ray and process start-up part of the time; two at a time keep
# 2 cores busy (TEST_WORKERS=0: one process).
TEST_WORKERS ?= 2

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/raysmith run pipelines/configs/quickstart.yaml
	$(BIN)/raysmith tune pipelines/configs/quickstart.yaml --restart
	$(BIN)/raysmith runs --experiment quickstart --limit 5

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) mlflow.db mlartifacts raysmith_runs ray_results
