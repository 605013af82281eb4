# The README's two commands are `make demo` and `make test`; each sets up what it needs.
.PHONY: setup stack stack-down test-tools monitor chaos chaos-cluster demo test lint typecheck pytest bench-ingest bench-e2e bench-scoring bench-notifier bench-orchestrator bench-segmenter

setup:
	scripts/bootstrap

stack: setup
	scripts/stack up

stack-down:
	scripts/stack down

test-tools:
	scripts/test-tools

monitor:
	scripts/monitor

demo: stack
	.venv/bin/python -m nudge_devtools.demo

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

typecheck: setup
	.venv/bin/mypy

pytest: stack test-tools
	.venv/bin/pytest

test: lint typecheck pytest

bench-ingest: stack
	.venv/bin/python -m bench.ingest

# The proof suite (docs/proof.md): latency through the whole pipeline, then faults under load.
bench-e2e: stack
	.venv/bin/python -m bench.e2e

bench-notifier: stack
	.venv/bin/python -m bench.notifier

# Faults under load on a private stack (own data folder and ports; the dev stack is untouched).
chaos: setup
	.venv/bin/python -m bench.chaos

chaos-cluster: setup
	.venv/bin/python -m bench.chaos --brokers 3

# Scoring throughput: one scoring process draining 1,000,000 events of 100,000 contacts
# scored by 50 rules, beside the raw aiokafka consume rate (docs/benchmarks.md).
bench-scoring: stack
	.venv/bin/python -m bench.scoring

bench-orchestrator: stack
	.venv/bin/python -m bench.orchestrator

# The segmenter at 1,000,000 contacts and 10,000,000 events: a backfill, then real-time
# throughput and latency with 200 segments (docs/benchmarks.md). Sizes:
# NUDGE_BENCH_CONTACTS, NUDGE_BENCH_EVENTS.
bench-segmenter: stack
	.venv/bin/python -m bench.segmenter
