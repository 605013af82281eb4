"""What the proof suite's runs share: an isolated sandbox on a stack (its own database and
topic prefix, like the test fixtures), the load generator (contacts who view the pricing
page three times, as an SDK would post them, retrying 503s), and the checks that compare
what was acknowledged with what PostgreSQL and the SMTP sink hold."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import os
import shutil
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
from aiokafka.errors import KafkaError
from sqlalchemy.engine import make_url

from nudge_common.events import Topic
from nudge_common.settings import NudgeSettings
from nudge_common.topics import delete_topics, ensure_topics
from nudge_devtools.pipeline import read_topic
from nudge_devtools.seed import PRICING_POINTS, SeededWorkspace, seed_workspace
from nudge_devtools.services import free_port, migrate_all

EVENTS_PER_CONTACT = 3
"""Three "Viewed Pricing" (+20 each) take a contact over the segment's 50 points: exactly
one welcome email per contact."""

RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
REQUEST_TIMEOUT_S = 30.0


# ----------------------------------------------------------------------------- sandbox


@dataclass(frozen=True)
class Sandbox:
    settings: NudgeSettings
    env: dict[str, str]
    """What a service process needs to join this sandbox."""


def admin_dsn(settings: NudgeSettings, database: str | None = None) -> str:
    url = make_url(settings.database_url).set(drivername="postgresql")
    if database is not None:
        url = url.set(database=database)
    return url.render_as_string(hide_password=False)


async def _execute(dsn: str, statement: str) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def sandbox(
    base: NudgeSettings,
    name: str,
    *,
    replication_factor: int = 1,
    min_insync_replicas: int | None = None,
) -> AsyncIterator[Sandbox]:
    """A fresh database and topic prefix on the stack ``base`` points at, migrated; both are
    deleted on the way out."""
    suffix = uuid.uuid4().hex[:8]
    database = f"nudge_{name}_{suffix}"
    await _execute(admin_dsn(base), f'CREATE DATABASE "{database}"')
    url = make_url(base.database_url).set(database=database).render_as_string(hide_password=False)
    settings = base.model_copy(update={"database_url": url, "topic_prefix": f"{name}-{suffix}."})
    try:
        await ensure_topics(
            settings,
            replication_factor=replication_factor,
            min_insync_replicas=min_insync_replicas,
        )
        await asyncio.to_thread(migrate_all, settings)
        yield Sandbox(
            settings,
            {
                "NUDGE_DATABASE_URL": url,
                "NUDGE_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
                "NUDGE_TOPIC_PREFIX": settings.topic_prefix,
            },
        )
    finally:
        with contextlib.suppress(KafkaError, OSError, TimeoutError):
            await asyncio.wait_for(delete_topics(settings), 30)
        with contextlib.suppress(OSError, asyncpg.PostgresError, TimeoutError):
            await _execute(admin_dsn(base), f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


async def new_workspace(settings: NudgeSettings, label: str) -> SeededWorkspace:
    workspace_id = f"{label}-{uuid.uuid4().hex[:10]}"
    return await seed_workspace(settings, workspace_id, write_key=f"wk-{workspace_id}")


# ----------------------------------------------------------------------------- load


@dataclass
class Contact:
    user_id: str
    email: str
    message_ids: list[str]
    sent: int = 0
    acked: set[str] = field(default_factory=set)
    last_ack: float | None = None
    """``time.monotonic()`` of the 200 that acknowledged this contact's last event."""


@dataclass
class LoadReport:
    target_rate: float
    contacts: list[Contact]
    started: float
    finished: float = 0.0
    statuses: Counter[str] = field(default_factory=Counter)
    """Every answer ingest gave, retries included: "200", "503", "transport", ..."""
    timeline: list[tuple[float, str]] = field(default_factory=list)
    """(``time.monotonic()``, outcome) of every answer."""
    requests: int = 0
    retries: int = 0
    send_lag_max_s: float = 0.0
    """How late the generator sent a request after its slot (an overloaded generator)."""

    @property
    def events_sent(self) -> int:
        return sum(len(c.message_ids) for c in self.contacts)

    @property
    def events_acked(self) -> int:
        return sum(len(c.acked) for c in self.contacts)

    @property
    def achieved_rate(self) -> float:
        """Acknowledged events per second, from the first send to the last 200."""
        return self.events_acked / max(self.finished - self.started, 1e-9)

    def acked_ids(self) -> set[str]:
        return {message_id for contact in self.contacts for message_id in contact.acked}


def contacts_for(rate: float, duration_s: float, label: str) -> list[Contact]:
    """As many contacts as ``rate`` events per second for ``duration_s`` make."""
    return make_contacts(int(rate * duration_s) // EVENTS_PER_CONTACT, label)


def make_contacts(count: int, label: str) -> list[Contact]:
    run = uuid.uuid4().hex[:6]
    return [
        Contact(
            user_id=f"{label}-{run}-{i}",
            email=f"{label}-{run}-{i}@bench.example",
            message_ids=[str(uuid.uuid4()) for _ in range(EVENTS_PER_CONTACT)],
        )
        for i in range(count)
    ]


def viewed_pricing(contact: Contact, message_id: str) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": contact.user_id,
        "event": "Viewed Pricing",
        "messageId": message_id,
        "properties": {"plan": "pro"},
        "context": {"traits": {"name": contact.user_id, "email": contact.email}},
    }


def batch_size_for(rate: float, max_requests_per_s: float) -> int:
    """Events per request: one per call up to ``max_requests_per_s``, then batches, as a
    server-side SDK that flushes its queue every ``1 / max_requests_per_s`` seconds."""
    return max(1, math.ceil(rate / max_requests_per_s))


class KeepAlive:
    """Keep-alive HTTP/1.1 connections to one loopback server, for load generators: a
    request costs tens of microseconds here, where httpx's pool costs milliseconds under
    load (its bookkeeping grows with the connections and queued requests), and the
    generator shares the machine with what it measures."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        parsed = httpx.URL(url)
        self.host, self.port = parsed.host, parsed.port or 80
        self.head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": parsed.host, **headers}.items())
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: bytes) -> int:
        """The answer's status; raises ConnectionError when the connection failed, after
        dropping it. A kept-alive connection the server closed meanwhile (its idle
        timeout) is replaced by a new one once, as HTTP clients do."""
        if self.idle:
            try:
                return await self._post(self.idle.pop(), path, body)
            except ConnectionError:
                pass
        try:
            connection = await asyncio.open_connection(self.host, self.port)
        except OSError as error:
            raise ConnectionError(f"cannot connect to {self.host}:{self.port}") from error
        return await self._post(connection, path, body)

    async def _post(
        self, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter], path: str, body: bytes
    ) -> int:
        reader, writer = connection
        try:
            writer.write(
                f"POST {path} HTTP/1.1\r\n{self.head}Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line[15:])
                    for line in head.split(b"\r\n")
                    if line[:15].lower() == b"content-length:"
                ),
                None,
            )
            if length is None:
                raise ConnectionError("an answer without Content-Length")
            await reader.readexactly(length)
        except BaseException as error:  # cancelled too: the connection is mid-answer
            writer.close()
            if isinstance(error, OSError | asyncio.IncompleteReadError | asyncio.LimitOverrunError):
                raise ConnectionError(f"connection to {self.host}:{self.port} failed") from error
            raise
        self.idle.append((reader, writer))
        return int(head[9:12])

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


async def run_load(
    ingest_url: str,
    workspace: SeededWorkspace,
    contacts: list[Contact],
    *,
    rate: float,
    max_requests_per_s: float = 100.0,
    max_in_flight: int = 256,
    retry_deadline_s: float = 120.0,
    stop: asyncio.Event | None = None,
) -> LoadReport:
    """Post the ``contacts``' events at ``rate`` events per second (until ``stop`` is set),
    open-loop: each request leaves at its slot whatever happened to the previous ones.
    Each contact's three events go out in order in consecutive slots. A 429, 5xx or lost
    connection is retried with the same messageIds (as an SDK does) until a 200 or
    ``retry_deadline_s``; only a 200 acknowledges."""
    batch = batch_size_for(rate, max_requests_per_s)
    stream = [(c, m) for c in contacts for m in c.message_ids]
    chunks = [stream[i : i + batch] for i in range(0, len(stream), batch)]
    report = LoadReport(rate, contacts, started=time.monotonic())
    in_flight = asyncio.Semaphore(max_in_flight)
    basic = base64.b64encode(f"{workspace.write_key}:".encode()).decode()
    client = KeepAlive(ingest_url, {"Authorization": f"Basic {basic}"})

    async def post(chunk: list[tuple[Contact, str]]) -> None:
        if len(chunk) == 1:
            path, body = "/v1/track", viewed_pricing(*chunk[0])
        else:
            path, body = "/v1/batch", {"batch": [viewed_pricing(c, m) for c, m in chunk]}
        encoded = orjson.dumps(body)
        deadline = time.monotonic() + retry_deadline_s
        delay = 0.1
        try:
            while True:
                report.requests += 1
                try:
                    status: int | None = await asyncio.wait_for(
                        client.post(path, encoded), REQUEST_TIMEOUT_S
                    )
                    outcome = str(status)
                except (ConnectionError, TimeoutError):
                    status, outcome = None, "transport"
                report.statuses[outcome] += 1
                report.timeline.append((time.monotonic(), outcome))
                if status == 200:
                    now = time.monotonic()
                    for contact, message_id in chunk:
                        contact.acked.add(message_id)
                        if len(contact.acked) == EVENTS_PER_CONTACT:
                            contact.last_ack = now
                    report.finished = max(report.finished, now)
                    return
                if status is not None and status not in RETRIED_STATUSES:
                    return  # a 4xx is a bug in the generator: counted, never retried
                if time.monotonic() > deadline:
                    return
                report.retries += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        finally:
            in_flight.release()

    tasks: set[asyncio.Task[None]] = set()
    interval = batch / rate
    try:
        for index, chunk in enumerate(chunks):
            if stop is not None and stop.is_set():
                break
            slot = report.started + index * interval
            if (wait := slot - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            await in_flight.acquire()
            report.send_lag_max_s = max(report.send_lag_max_s, time.monotonic() - slot)
            for contact, _ in chunk:
                contact.sent += 1
            task = asyncio.create_task(post(chunk))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        client.close()
    report.contacts = [c for c in contacts if c.sent]  # a stop leaves the rest unsent
    return report


CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and its living descendants
    (uvicorn's workers, PostgreSQL's backends), read from /proc."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        # after the command: state, ppid, ... utime and stime are fields 14 and 15 of stat
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])))
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, (ppid, _) in stats.items() if ppid == parent]
        tree.update(children)
        frontier.extend(children)
    return sum(stats[p][1] for p in tree if p in stats) / CLOCK_TICKS_PER_S


def stack_pids(data_dir: Path) -> dict[str, int]:
    """The dev stack's Kafka and PostgreSQL server pids, from their pid files."""
    found = {}
    for name, pid_file in (
        ("kafka", data_dir / "kafka" / "kafka.pid"),
        ("postgres", data_dir / "postgres" / "data" / "postmaster.pid"),
    ):
        with contextlib.suppress(OSError, ValueError, IndexError):
            found[name] = int(pid_file.read_text().split()[0])
    return found


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value at or above ``q`` percent of them."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# ----------------------------------------------------------------------------- invariants


@dataclass(frozen=True)
class Invariants:
    events_acked: int
    events_stored: int
    events_lost: int
    """Acknowledged, but not in scoring.events."""
    events_stored_twice: int
    scores_checked: int
    scores_wrong: int
    emails_expected: int
    emails_sent: int
    emails_missing: int
    emails_duplicated: int
    dead_letters: int
    dead_letters_without_reason: int

    def holds(self) -> dict[str, bool]:
        return {
            "every acknowledged event stored": self.events_lost == 0,
            "no event stored twice": self.events_stored_twice == 0,
            "every score = 20 x stored events": self.scores_wrong == 0,
            "every expected email sent": self.emails_missing == 0,
            "no email sent twice": self.emails_duplicated == 0,
            "no dead letter without a reason": self.dead_letters_without_reason == 0,
        }


async def check_invariants(
    settings: NudgeSettings,
    workspace_id: str,
    contacts: list[Contact],
    emails: list[str],
) -> Invariants:
    """Compare what ingest acknowledged to ``contacts`` with scoring's rows, the lead
    scores, the emails the sink received (``emails``: one To per message) and the
    dead-letter topic. Read with plain SQL, so the check does not depend on a service's
    store module."""
    acked = {m for c in contacts for m in c.acked}
    database = make_url(settings.database_url).database
    connection = await asyncpg.connect(admin_dsn(settings, database))
    try:
        rows = await connection.fetch(
            "SELECT message_id, contact_id, name FROM scoring.events WHERE workspace_id = $1",
            workspace_id,
        )
        scores = {
            r["contact_id"]: r["points"]
            for r in await connection.fetch(
                "SELECT contact_id, points FROM scoring.scores"
                " WHERE workspace_id = $1 AND model = 'lead'",
                workspace_id,
            )
        }
    finally:
        await connection.close()
    stored = Counter(r["message_id"] for r in rows)
    expected_points: Counter[Any] = Counter()
    for r in rows:
        if r["name"] == "Viewed Pricing":
            expected_points[r["contact_id"]] += PRICING_POINTS
    wrong = sum(
        1 for contact_id, points in expected_points.items() if scores.get(contact_id) != points
    )
    ours = {c.email for c in contacts}
    received = Counter(to for to in emails if to in ours)
    # a contact qualifies when each of its three events was acknowledged or stored (a 503'd
    # event may be stored without a 200: it is not lost, and it counts)
    qualified = {
        c.email for c in contacts if all(m in stored or m in c.acked for m in c.message_ids)
    }
    dead = await read_topic(settings, Topic.DEAD_LETTER)
    without_reason = sum(
        1 for record in dead if not dict(record.headers).get("nudge.reason", b"").strip()
    )
    return Invariants(
        events_acked=len(acked),
        events_stored=len(stored),
        events_lost=len(acked - stored.keys()),
        events_stored_twice=sum(1 for n in stored.values() if n > 1),
        scores_checked=len(expected_points),
        scores_wrong=wrong,
        emails_expected=len(qualified),
        emails_sent=sum(received.values()),
        emails_missing=len(qualified - received.keys()),
        emails_duplicated=sum(n - 1 for n in received.values() if n > 1),
        dead_letters=len(dead),
        dead_letters_without_reason=without_reason,
    )


# ----------------------------------------------------------------------------- private stack


class PrivateStack:
    """A stack of our own (``scripts/stack`` with its own data folder and free ports), for
    runs that stop Kafka or PostgreSQL: the shared dev stack is never touched."""

    def __init__(self, data_dir: Path, *, brokers: int = 1) -> None:
        self.data_dir = data_dir
        self.brokers = brokers
        kafka_port = free_port_block(2 * brokers) if brokers > 1 else free_port()
        self.env = {
            "NUDGE_DATA_DIR": str(data_dir),
            "NUDGE_KAFKA_PORT": str(kafka_port),
            "NUDGE_KAFKA_CONTROLLER_PORT": str(kafka_port + 1 if brokers > 1 else free_port()),
            "NUDGE_PG_PORT": str(free_port()),
            "NUDGE_KAFKA_BROKERS": str(brokers),
            "NUDGE_STACK_STOP_TIMEOUT": "20",
        }
        ports = [kafka_port + 2 * i for i in range(brokers)] if brokers > 1 else [kafka_port]
        self.settings = NudgeSettings(
            kafka_bootstrap_servers=",".join(f"127.0.0.1:{port}" for port in ports),
            database_url=(
                f"postgresql+asyncpg://nudge:nudge@127.0.0.1:{self.env['NUDGE_PG_PORT']}/nudge"
            ),
        )

    async def run(self, *args: str) -> float:
        """``scripts/stack ARGS`` against this stack, without blocking the event loop;
        returns how long it took."""
        started = time.monotonic()
        process = await asyncio.create_subprocess_exec(
            str(STACK),
            *args,
            env={**os.environ, **self.env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"scripts/stack {' '.join(args)} failed:\n{output.decode()}")
        return time.monotonic() - started

    def broker_pid(self, node: int) -> int:
        folder = self.data_dir / "kafka" if self.brokers == 1 else self.data_dir / f"kafka-{node}"
        return int((folder / "kafka.pid").read_text().strip())

    async def destroy(self) -> None:
        with contextlib.suppress(RuntimeError):
            await self.run("reset")
        shutil.rmtree(self.data_dir, ignore_errors=True)


STACK = Path(__file__).resolve().parents[1] / "scripts" / "stack"


def free_port_block(size: int) -> int:
    """The first of ``size`` consecutive free ports (checked, not reserved)."""
    for _ in range(100):
        first = free_port()
        if first + size > 65535:
            continue
        sockets = []
        try:
            for port in range(first, first + size):
                sock = socket.socket()
                sock.bind(("127.0.0.1", port))
                sockets.append(sock)
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return first
    raise RuntimeError(f"no {size} consecutive free ports")
