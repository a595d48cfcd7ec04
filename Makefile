# Every target installs what it needs into .venv first; nothing has to be installed by hand.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -qq --disable-pip-version-check
STAMP  := $(VENV)/.installed
# The decide layer compiled in place (setup.py): again whenever one of its sources changes.
COMPILED := decide/compiled.json

# Pub/Sub emulator and Beam must only ever talk to loopback here.
export NO_PROXY := 127.0.0.1,localhost
export no_proxy := 127.0.0.1,localhost

.PHONY: run test bench bench-full venv clean

venv: $(STAMP)

# An editable install keeps no compiled modules of its own (hence plain Python here):
# $(COMPILED) builds them in place.
$(STAMP): setup.py pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	WALKEROS_SEGMENT_PURE_PYTHON=1 $(PIP) install -c constraints.txt -e '.[test]'
	touch $(STAMP)

$(COMPILED): $(STAMP) $(filter-out decide/__init__.py,$(wildcard decide/*.py)) $(wildcard decide/*.pxd)
	$(PY) setup.py -q build_ext --inplace

## make run: the main job on the bundled example events, no credentials, no network.
run: $(COMPILED)
	$(PY) -m pipeline demo

## make test: the style checks, the type check of the decide layer, then the whole test suite
## (unit, Beam on the DirectRunner, emulators on loopback).
test: $(COMPILED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q tests

## make bench: throughput and memory figures at 10k and 100k events (not a test; a few minutes).
bench: $(COMPILED)
	$(PY) -m bench

## make bench-full: the same with 1,000,000 events as well (about half an hour).
bench-full: $(COMPILED)
	$(PY) -m bench --full

clean:
	rm -rf $(VENV) out build dist *.egg-info decide/*.c decide/*.so decide/compiled.json
