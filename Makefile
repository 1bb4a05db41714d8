# Two commands on a fresh machine: `make quickstart` and `make test`.
# Both create (or reuse) .venv and install everything they need into it.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: quickstart test test-fast lint install clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-cache-dir $(TORCH)
	$(PY) -m pip install -q --no-cache-dir -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/prism quickstart --out runs/quickstart

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --durations=15 $(PYTEST_ARGS)

# ruff (configured in pyproject.toml): pyflakes, pycodestyle, import order, bugbear, pyupgrade.
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

# Local iteration: everything except the slow end-to-end CLI runs.
test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
