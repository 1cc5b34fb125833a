# Two commands do everything on a fresh machine: `make train` and `make test`.
# Both first create .venv from requirements.txt (once; re-run only when requirements.txt changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/base
PYTEST_ARGS ?=
# Two pytest workers: most test time is XLA compilation, which runs on one core. Whole files go
# to a worker, longest first (the order tests/conftest.py gives; no reordering by test count).
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

.PHONY: setup train test test-fast clean-venv

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $@

setup: $(VENV)/.installed

# The embedded default: prepares the pairs and plan stores if missing, trains, validates.
train: setup
	$(PY) -m fape_jax.train --config=configs/base.py --workdir=$(WORKDIR)

# pytest exit code 5 means "no tests collected": that is a failure here, not a pass.
test: setup
	$(PY) -m pytest tests $(XDIST) --durations=15 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The inner loop: everything but the tests marked `slow` (CLI subprocesses, several processes).
test-fast: setup
	$(PY) -m pytest tests $(XDIST) -m "not slow" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean-venv:
	rm -rf $(VENV)
