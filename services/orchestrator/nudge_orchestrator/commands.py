"""The orchestrator's own commands (``python -m nudge_orchestrator <command>``).

``create-api-key`` bootstraps a workspace's first secret key of the marketers' API (later
keys can be made through ``POST /api/v1/api-keys``): it prints the secret once, as JSON on
stdout; only its hash is stored.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from nudge_common.cli import Command
from nudge_common.db import create_engine, create_sessionmaker, transaction
from nudge_common.settings import NudgeSettings
from nudge_orchestrator import store


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workspace", required=True, help="the workspace id")
    parser.add_argument(
        "--scopes",
        default="read,write,send",
        help=f"comma-separated, among {', '.join(store.SCOPES)} (default: all)",
    )
    parser.add_argument("--name", default="bootstrap", help="a label for the key")


def _create_api_key(settings: NudgeSettings, args: argparse.Namespace) -> int:
    scopes = [scope.strip() for scope in args.scopes.split(",") if scope.strip()]
    unknown = sorted(set(scopes) - set(store.SCOPES))
    if not scopes or unknown:
        print(
            f"--scopes: unknown {', '.join(unknown) or '(none given)'}; "
            f"choose among {', '.join(store.SCOPES)}",
            file=sys.stderr,
        )
        return 2
    if not args.workspace.strip():
        print("--workspace: must not be empty", file=sys.stderr)
        return 2

    async def create() -> dict[str, object]:
        engine = create_engine(settings)
        try:
            async with transaction(create_sessionmaker(engine)) as session:
                key, secret = await store.create_api_key(
                    session, workspace_id=args.workspace, name=args.name, scopes=scopes
                )
        finally:
            await engine.dispose()
        return {
            "id": str(key.id),
            "workspace_id": key.workspace_id,
            "name": key.name,
            "scopes": key.scopes,
            "secret": secret,
        }

    print(json.dumps(asyncio.run(create())))
    return 0


CREATE_API_KEY = Command(
    name="create-api-key",
    help="create a secret API key for a workspace and print it once",
    add_arguments=_add_arguments,
    run=_create_api_key,
)
