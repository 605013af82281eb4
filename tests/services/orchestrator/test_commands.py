"""``python -m nudge_orchestrator create-api-key``: the first key of a workspace, printed
once, stored hashed, usable on the API; bad scopes are refused with a clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

from nudge_common.db import SessionMaker, transaction
from nudge_orchestrator import store
from tests.conftest import StackHandle


def run_cli(stack: StackHandle, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nudge_orchestrator", *args],
        env={**os.environ, **stack.env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_create_api_key_prints_the_secret_once_and_stores_its_hash(
    stack: StackHandle, sessionmaker: SessionMaker
) -> None:
    workspace_id = f"ws-{uuid.uuid4().hex[:12]}"
    done = run_cli(stack, "create-api-key", "--workspace", workspace_id, "--scopes", "read,send")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["workspace_id"] == workspace_id
    assert printed["scopes"] == ["read", "send"]
    secret = printed["secret"]
    assert secret.startswith("nsk_")
    async with transaction(sessionmaker) as session:
        key = await store.api_key_by_secret(session, secret=secret)
        [listed] = await store.list_api_keys(session, workspace_id=workspace_id)
    assert key is not None
    assert key.workspace_id == workspace_id
    assert key.scopes == ["read", "send"]
    assert listed.prefix == secret[:12]  # only a prefix and the hash are kept


def test_create_api_key_refuses_unknown_scopes(stack: StackHandle) -> None:
    done = run_cli(stack, "create-api-key", "--workspace", "w", "--scopes", "read,admin")
    assert done.returncode == 2
    assert "--scopes: unknown admin" in done.stderr
    assert done.stdout == ""
