"""Fixtures on the real stack: each test session gets its own PostgreSQL database and its own
topic prefix on the broker that ``scripts/stack`` runs, so runs never see each other."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from aiokafka.errors import KafkaError
from sqlalchemy.engine import make_url

from nudge_common.db import SessionMaker, create_engine, create_sessionmaker
from nudge_common.settings import NudgeSettings
from nudge_common.topics import delete_topics, ensure_topics
from nudge_devtools.seed import SeededWorkspace, seed_workspace
from nudge_devtools.services import free_port, migrate_all

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class StackHandle:
    settings: NudgeSettings
    env: dict[str, str]
    """What a service process needs to join this test session's stack."""
    log_dir: Path


def _admin_dsn(settings: NudgeSettings) -> str:
    url = make_url(settings.database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


async def _stack_is_up(settings: NudgeSettings) -> bool:
    try:
        connection = await asyncpg.connect(_admin_dsn(settings), timeout=3)
        await connection.close()
        await asyncio.wait_for(ensure_topics(settings, deadline_s=3), 10)
    except (OSError, TimeoutError, KafkaError, asyncpg.PostgresError):
        return False
    return True


async def _execute(dsn: str, statement: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackHandle]:
    base = NudgeSettings()
    if not asyncio.run(_stack_is_up(base)):
        subprocess.run([str(REPO / "scripts" / "stack"), "up"], check=True)
    suffix = uuid.uuid4().hex[:10]
    database = f"nudge_test_{suffix}"
    admin_dsn = _admin_dsn(base)
    asyncio.run(_execute(admin_dsn, f'CREATE DATABASE "{database}"'))
    url = make_url(base.database_url).set(database=database).render_as_string(hide_password=False)
    settings = base.model_copy(
        update={"database_url": url, "topic_prefix": f"test-{suffix}.", "environment": "test"}
    )
    asyncio.run(ensure_topics(settings))
    migrate_all(settings)
    env = {
        "NUDGE_ENVIRONMENT": "test",
        "NUDGE_DATABASE_URL": url,
        "NUDGE_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "NUDGE_TOPIC_PREFIX": settings.topic_prefix,
        "NUDGE_CONSUMER_POLL_TIMEOUT_MS": "50",
    }
    yield StackHandle(settings, env, tmp_path_factory.mktemp("service-logs"))
    asyncio.run(delete_topics(settings))
    asyncio.run(_execute(admin_dsn, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))


def kafka_script(env: dict[str, str], command: str) -> None:
    """``scripts/stack <command> kafka`` on the broker that ``env`` names."""
    subprocess.run(
        [str(REPO / "scripts" / "stack"), command, "kafka"],
        env=env,
        check=True,
        capture_output=True,
    )


@pytest.fixture
def own_kafka(
    stack: StackHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """A broker of this test's own, for tests that stop it (never the shared one): the env to
    run ``scripts/stack`` on it, with ``NUDGE_KAFKA_BOOTSTRAP_SERVERS`` pointing at it."""
    port = free_port()
    env = {
        **os.environ,
        "NUDGE_DATA_DIR": str(tmp_path_factory.mktemp("own-kafka")),
        "NUDGE_KAFKA_PORT": str(port),
        "NUDGE_KAFKA_CONTROLLER_PORT": str(free_port()),
        "NUDGE_PG_PORT": str(free_port()),
        "NUDGE_TOPIC_PREFIX": stack.settings.topic_prefix,
        "NUDGE_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}",
    }
    kafka_script(env, "up")
    try:
        yield env
    finally:
        subprocess.run([str(REPO / "scripts" / "stack"), "reset", "kafka"], env=env, check=False)


@pytest.fixture(scope="session")
async def sessionmaker(stack: StackHandle) -> AsyncIterator[SessionMaker]:
    engine = create_engine(stack.settings)
    yield create_sessionmaker(engine)
    await engine.dispose()


@pytest.fixture
async def workspace(stack: StackHandle) -> SeededWorkspace:
    workspace_id = f"ws-{uuid.uuid4().hex[:12]}"
    return await seed_workspace(stack.settings, workspace_id, write_key=f"wk-{workspace_id}")
