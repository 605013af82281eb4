"""The command line every service shares: ``python -m nudge_<service> migrate|run``, plus
the service's own commands (:class:`Command`, listed in its :class:`ServiceSpec`)."""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from nudge_common import migrations
from nudge_common.logging import configure_logging
from nudge_common.metrics import MULTIPROC_DIR_VARIABLE
from nudge_common.settings import NudgeSettings


@dataclass(frozen=True)
class Command:
    """A service-specific command, e.g. the orchestrator's ``create-api-key``: its
    arguments are declared on its own subparser, and ``run`` gets the service's settings
    (logging configured) and the parsed arguments; what it returns is the exit status."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[NudgeSettings, argparse.Namespace], int]


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    app_factory: str
    """Import string of the FastAPI app factory, e.g. ``nudge_scoring.app:create_app``."""
    schema: str
    migrations: Path
    settings: type[NudgeSettings]
    commands: tuple[Command, ...] = ()
    """Commands of this service beside migrate, revision and run."""


def main(spec: ServiceSpec, argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m nudge_{spec.name}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help=f"create or upgrade the '{spec.schema}' schema")
    revision = commands.add_parser("revision", help="autogenerate a migration from store.py")
    revision.add_argument("-m", "--message", required=True)
    run = commands.add_parser("run", help="serve HTTP and run the consumers")
    run.add_argument("--workers", type=int, default=1, help="worker processes (uvicorn)")
    extra = {command.name: command for command in spec.commands}
    for command in spec.commands:
        command.add_arguments(commands.add_parser(command.name, help=command.help))
    args = parser.parse_args(argv)

    settings = spec.settings()
    configure_logging(service=spec.name, level=settings.log_level, json=settings.log_json)
    if args.command in extra:
        raise SystemExit(extra[args.command].run(settings, args))
    if args.command == "migrate":
        migrations.upgrade(settings, schema=spec.schema, script_location=spec.migrations)
    elif args.command == "revision":
        migrations.autogenerate(
            settings, schema=spec.schema, script_location=spec.migrations, message=args.message
        )
    else:
        if args.workers > 1:
            prepare_multiprocess_metrics()
        uvicorn.run(
            spec.app_factory,
            factory=True,
            host=settings.http_host,
            port=settings.http_port,
            workers=args.workers,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=30,
        )


def prepare_multiprocess_metrics() -> None:
    """Before the workers start: a fresh ``PROMETHEUS_MULTIPROC_DIR`` (made when not given,
    emptied of an earlier run's files when given), inherited by every worker process."""
    directory = os.environ.get(MULTIPROC_DIR_VARIABLE)
    if not directory:
        directory = tempfile.mkdtemp(prefix="nudge-metrics-")
        os.environ[MULTIPROC_DIR_VARIABLE] = directory
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.remove(os.path.join(directory, name))
