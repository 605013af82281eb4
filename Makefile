# The README's two commands are `make demo` and `make test`; each sets up what it needs.
.PHONY: setup stack stack-down demo test lint typecheck pytest

setup:
	scripts/bootstrap

stack: setup
	scripts/stack up

stack-down:
	scripts/stack down

demo: stack
	.venv/bin/python -m nudge_devtools.demo

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

typecheck: setup
	.venv/bin/mypy

pytest: stack
	.venv/bin/pytest

test: lint typecheck pytest
