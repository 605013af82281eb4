"""A kill -9 of the notifier process in the middle of sending: after the restart every
request is settled and no message reached the SMTP server twice. Claims found still
``sending`` become ``unknown`` and are not resent (docs/notifier.md, the restart rule)."""

from __future__ import annotations

import signal
import uuid
from collections import Counter
from datetime import UTC, datetime

from nudge_common.db import SessionMaker
from nudge_common.events import (
    NOTIFICATION_REQUESTED,
    ContactSnapshot,
    NotificationRequested,
    Topic,
)
from nudge_common.kafka import OutgoingMessage, create_producer, publish
from nudge_devtools.pipeline import eventually
from nudge_devtools.services import ServiceProcess, free_port
from nudge_notifier.consumer import INTERRUPTED
from tests.conftest import StackHandle
from tests.services.notifier.conftest import Notifier
from tests.services.notifier.fakes import ScriptedSmtp

REQUESTS = 120


async def test_kill_9_mid_send_sends_no_message_twice(
    stack: StackHandle, sessionmaker: SessionMaker
) -> None:
    smtp = ScriptedSmtp(data_delay_s=0.05)
    smtp.start()
    env = {
        **stack.env,
        "NUDGE_SMTP_PORT": str(smtp.port),
        "NUDGE_SMTP_MAX_CONNECTIONS": "4",
        "NUDGE_CONSUMER_BATCH_MAX_RECORDS": "20",
    }
    process = ServiceProcess("notifier", free_port(), env, stack.log_dir / "notifier-crash.log")
    producer = create_producer(stack.settings)
    await producer.start()
    try:
        helper = Notifier(stack, None, None, producer, sessionmaker)  # type: ignore[arg-type]
        ws = f"ws-{uuid.uuid4().hex[:10]}"
        template = await helper.template(ws)
        keys = [f"crash-{uuid.uuid4().hex}" for _ in range(REQUESTS)]
        await publish(
            producer,
            stack.settings,
            [
                OutgoingMessage(
                    Topic.NOTIFICATIONS,
                    key=key,
                    envelope=NOTIFICATION_REQUESTED.envelope(
                        workspace_id=ws,
                        occurred_at=datetime.now(UTC),
                        payload=NotificationRequested(
                            idempotency_key=key,
                            channel="email",
                            template_id=template,
                            contact=ContactSnapshot(
                                contact_id=uuid.uuid4(), traits={"email": f"{key}@example.com"}
                            ),
                        ),
                    ),
                )
                for key in keys
            ],
        )
        process.start()

        async def some_sent() -> bool:
            return len(smtp.received()) >= 15

        await eventually(some_sent, deadline_s=60, what="the first emails")
        process.signal(signal.SIGKILL)
        assert await process.wait_exit() == -signal.SIGKILL
        at_kill = len(smtp.received())
        assert at_kill < REQUESTS, "killed before the end"

        process.start()
        rows = await helper.settled(keys, deadline_s=90)
        received = Counter(str(m["X-Nudge-Idempotency-Key"]) for m in smtp.received())
        assert max(received.values()) == 1, "a message reached the server twice"
        statuses = Counter(row.status for row in rows.values())
        assert set(statuses) <= {"sent", "unknown"}
        assert statuses["unknown"] >= 1, "the kill landed while messages were in flight"
        unknown = [k for k, row in rows.items() if row.status == "unknown"]
        assert all(rows[k].reason == INTERRUPTED for k in unknown)
        sent = {k for k, row in rows.items() if row.status == "sent"}
        assert sent <= set(received)
        assert set(received) <= set(keys)
        assert len(received) == len(sent) + len([k for k in unknown if k in received])
    finally:
        await process.stop()
        await producer.stop()
        smtp.stop()
