# Shortcuts; CI runs .ci/run (a clean venv, then the README's test command).
PYTHON ?= python

.PHONY: test lint format bench parity memory slow configs multinode schedules

test:
	$(PYTHON) -m pytest -q -x

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff format .

bench:
	$(PYTHON) bench/run.py

parity:  # every parity layout, the wide ones too (tests/spawn.py: WIDE)
	MESHTRAIN_WIDE=1 $(PYTHON) -m pytest -q -m parity

memory slow:
	$(PYTHON) -m pytest -q -m slow

configs:
	$(PYTHON) -m pytest -q -m configs

multinode:
	$(PYTHON) -m pytest -q -m multinode

schedules:
	$(PYTHON) bench/schedules.py
