# Fresh-machine entry points. torch is pinned to the local CPU build (an unpinned torch pulls
# several GB of CUDA wheels). bebop-spec depends on bebop-client (./clients): install both.
PY ?= python
TORCH ?= torch==2.13.0

.PHONY: install install-dev serve test test-random test-slow lint bench

install:
	$(PY) -m pip install $(TORCH)
	$(PY) -m pip install -e ./clients -e .

install-dev:
	$(PY) -m pip install $(TORCH)
	$(PY) -m pip install -e ".[dev]" -e ./clients

serve: install
	bebop serve

test:
	$(PY) -m pytest -q -p no:cacheprovider -p no:randomly tests

# Every test passes alone and in any order: the default suite shuffled (pytest-randomly), SEED=N.
test-random:
	$(PY) -m pytest -q -p no:cacheprovider $(if $(SEED),--randomly-seed=$(SEED)) tests

test-slow:
	$(PY) -m pytest -q -m slow tests

lint:
	ruff check . && ruff format --check .
