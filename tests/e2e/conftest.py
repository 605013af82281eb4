from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from nudge_devtools.services import Fleet, free_port
from nudge_devtools.smtp_sink import SmtpSink
from tests.conftest import StackHandle


@pytest.fixture(scope="session")
def smtp_sink() -> Iterator[SmtpSink]:
    sink = SmtpSink(port=free_port())
    sink.start()
    yield sink
    sink.stop()


@pytest.fixture(scope="module")
async def fleet(stack: StackHandle, smtp_sink: SmtpSink) -> AsyncIterator[Fleet]:
    """The five services as separate processes, as in production (the segmenter with two
    consumers of the contacts topic, so its partitions are split between them here)."""
    env = {**stack.env, "NUDGE_SMTP_PORT": str(smtp_sink.port), "NUDGE_CONTACTS_CONSUMERS": "2"}
    fleet = Fleet(env, stack.log_dir)
    try:
        await fleet.start()
        yield fleet
    finally:
        await fleet.stop()
