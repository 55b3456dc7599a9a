# The two commands of the README: `make demo` (the whole pipeline, locally) and `make test` (every test; CI's);
# `make test-fast` runs the tests that need no trained run and no kfp.local run (docs/testing.md).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test test-fast lock clean demo browser bytecode

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e . || $(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

# The report is checked in headless Chromium (Debian's package; root installs it, others are told how).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; } || \
	  { echo "headless Chromium is needed by the report's tests: sudo apt-get install chromium" >&2; exit 1; }

# Two test processes (pytest-xdist), each module's tests in one of them (its module fixtures are made once).
TEST_PROCESSES ?= 2

# The product's own bytecode, once: with PYTHONDONTWRITEBYTECODE set (as here and in many CI images) every step
# subprocess would compile it again; a .pyc older than its source is never used.
bytecode:
	@$(PY) -m compileall -q coughreg components pipeline.py

test: $(STAMP) browser bytecode
	$(PY) -m pytest -n $(TEST_PROCESSES) --dist loadscope

test-fast: $(STAMP) bytecode
	$(PY) -m pytest -m "not slow" -n $(TEST_PROCESSES) --dist loadscope

# Re-resolve the pins from the top-level package list (needs the registry).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet -r requirements.in
	{ echo "# Runtime pins: the local venv and docker/Dockerfile install exactly these (regenerate: make lock)."; \
	  .lock-venv/bin/pip freeze --exclude-editable; } > requirements.txt
	.lock-venv/bin/pip install --quiet -r requirements-dev.in
	{ echo "# Test, demo and lint pins on top of the runtime pins (regenerate: make lock)."; echo "-r requirements.txt"; \
	  .lock-venv/bin/pip freeze --exclude-editable | grep -vxFf requirements.txt; } > requirements-dev.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

.PHONY: demo
demo: $(STAMP) bytecode
	$(PY) pipeline.py demo

# Container images: names and immutable tags (the version and a digest of the sources) come from
# coughreg/runtime/images.py (COUGHREG_REGISTRY; COUGHREG_IMAGE_TAG replaces the tag).
CPU_IMAGE = $(shell $(PY) -c 'from coughreg.runtime.images import CPU_IMAGE; print(CPU_IMAGE)')
GPU_IMAGE = $(shell $(PY) -c 'from coughreg.runtime.images import GPU_IMAGE; print(GPU_IMAGE)')
BUILD_ARGS = --build-arg VERSION=$(shell $(PY) -c 'from coughreg.runtime.images import VERSION; print(VERSION)') \
	--build-arg REVISION=$(shell git rev-parse HEAD 2>/dev/null || echo unknown)

.PHONY: image push
image: $(STAMP)
	docker build -f docker/Dockerfile --target cpu $(BUILD_ARGS) -t $(CPU_IMAGE) .
	docker build -f docker/Dockerfile --target cuda $(BUILD_ARGS) -t $(GPU_IMAGE) .

push: image
	docker push $(CPU_IMAGE)
	docker push $(GPU_IMAGE)
