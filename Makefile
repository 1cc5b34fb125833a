# Two commands do everything on a fresh machine: `make train` and `make test`.
# Both first create .venv from requirements.txt, i.e. `pip install -c constraints.txt -e .[dev]`
# (once; re-run when requirements.txt, pyproject.toml or constraints.txt changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/base
PYTEST_ARGS ?=
# Two pytest workers: most test time is XLA compilation, which runs on one core. Whole files go
# to a worker, longest first (the order tests/conftest.py gives; no reordering by test count).
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The 'wallpapers' corpus set (fape_jax/data/corpus.py): photos from Debian wallpaper packages.
CORPUS_PACKAGES := mate-backgrounds lomiri-wallpapers-16.04 plasma-workspace-wallpapers
# The demo page's browser test (tests/test_demo.py) drives Debian's chromium through its driver.
BROWSER_PACKAGES := chromium chromium-driver
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: setup corpus browser train test test-fast clean-venv constraints

$(VENV)/.installed: requirements.txt pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $@

setup: $(VENV)/.installed

# apt_install(target, packages, hint): installs the Debian packages once (a no-op when all are
# installed: `dpkg-query` prints "install ok installed" per package and fails on unknown ones).
define apt_install
	@if ! dpkg-query -W -f='$${Status}\n' $(2) 2>/dev/null | grep -qv "ok installed" \
	  && dpkg-query -W $(2) >/dev/null 2>&1; then exit 0; fi; \
	command -v apt-get >/dev/null || { echo "make $(1): no apt-get here; install $(2) $(3)" >&2; \
	  exit 1; }; \
	$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	  --no-install-recommends $(2) >/dev/null
endef

# The wallpaper photos (fape_jax/data/corpus.py). Without apt-get, train on the photos bundled
# with Python packages: make train TRAIN_ARGS=--config.data.corpus=embedded
corpus:
	$(call apt_install,corpus,$(CORPUS_PACKAGES),or pass TRAIN_ARGS=--config.data.corpus=embedded)

# chromium and its driver, for the demo page's browser test (tests/test_demo.py).
browser:
	$(call apt_install,browser,$(BROWSER_PACKAGES),for the demo page's browser test)

# The embedded default: prepares the pairs and plan stores if missing, trains, validates.
TRAIN_ARGS ?=
train: setup $(if $(findstring corpus=embedded,$(TRAIN_ARGS)),,corpus)
	$(PY) -m fape_jax.train --config=configs/base.py --workdir=$(WORKDIR) $(TRAIN_ARGS)

# pytest exit code 5 means "no tests collected": that is a failure here, not a pass.
test: setup corpus browser
	$(PY) -m pytest tests $(XDIST) --durations=15 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The inner loop: everything but the tests marked `slow` (CLI subprocesses, several processes).
test-fast: setup browser
	$(PY) -m pytest tests $(XDIST) -m "not slow" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean-venv:
	rm -rf $(VENV)

# After upgrading packages in .venv (and a green `make test`): pin what is installed now.
constraints:
	$(PY) .ci/constraints.py > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt
