# The two commands of the README. Each sets up .venv first (idempotent).
.PHONY: run test setup

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/kvprof sweep

test: setup
	.venv/bin/python -m pytest -q tests
