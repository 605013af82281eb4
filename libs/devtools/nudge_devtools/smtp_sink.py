"""A real SMTP server (aiosmtpd) that keeps every message it accepts."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Collection
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import uvloop
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP


class _Collect:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's hook name
        arrived = time.monotonic()
        with self.sink.lock:
            self.sink.raw.append(envelope.content)
            self.sink.arrivals.append((arrived, ", ".join(envelope.rcpt_tos)))
        return "250 Message accepted for delivery"

    async def handle_EHLO(  # noqa: N802 - aiosmtpd's hook name
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        return advertise_pipelining(session, hostname, responses)


def advertise_pipelining(session: Any, hostname: str, responses: list[str]) -> list[str]:
    """An aiosmtpd ``handle_EHLO`` that also advertises PIPELINING (RFC 2920), as real
    MTAs do. aiosmtpd serves pipelined commands correctly without saying so: it reads
    each command line only after answering the one before (what comes early waits in its
    reader's buffer), answers DATA 503 when no RCPT was accepted, and reads the content
    only after its 354."""
    session.host_name = hostname  # aiosmtpd leaves this to the hook
    return [*responses[:-1], "250-PIPELINING", responses[-1]]


_PLAIN_ADDRESS = re.compile(
    r"<([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>"
)


class _Smtp(SMTP):
    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's, with a shortcut to the same result for the plain ``<local@domain>``
        that MAIL and RCPT carry here: aiosmtpd parses every address with the email
        package's header parser (and defines a class per call), a third of the sink's CPU
        per message, where an MTA spends microseconds. ``tests/libs/devtools`` holds the
        shortcut equal to aiosmtpd's parse."""
        match = _PLAIN_ADDRESS.match(arg)
        rest = "" if match is None else arg[match.end() :].lstrip(" \t")
        if (
            match is None
            or rest.startswith("(")  # a comment: aiosmtpd's parser skips it
            or len(match[1].rpartition("@")[0]) > (self.local_part_limit or len(arg))
        ):
            return super()._getaddr(arg)
        return match[1], rest


class _Controller(Controller):
    def factory(self) -> SMTP:
        return _Smtp(self.handler, **self.SMTP_kwargs)


class SmtpSink:
    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.raw: list[bytes] = []
        """Every message accepted, as sent; parsed when asked for (:meth:`received`), so
        the sink answers quickly under load: it shares its process with load generators."""
        self.arrivals: list[tuple[float, str]] = []
        """(``time.monotonic()`` when accepted, the envelope's recipients) of every message,
        in the order accepted: what latency measurements compare with their own clock."""
        self._parsed: list[EmailMessage] = []
        self.lock = threading.Lock()
        # uvloop: the sink shares its process (and the GIL) with load generators, and
        # answers several SMTP commands per message
        self.controller = _Controller(
            _Collect(self), hostname=host, port=port, loop=uvloop.new_event_loop()
        )
        self.port = port

    def start(self) -> None:
        self.controller.start()

    def stop(self) -> None:
        self.controller.stop()

    def received(self, *, to: Collection[str] | None = None) -> list[EmailMessage]:
        """Messages accepted so far, optionally only those to the given addresses."""
        with self.lock:
            raw = self.raw[len(self._parsed) :]
        for content in raw:
            message = message_from_bytes(content, policy=policy.default)
            assert isinstance(message, EmailMessage)
            self._parsed.append(message)
        messages = list(self._parsed)
        if to is None:
            return messages
        return [message for message in messages if message["To"] in to]

    async def wait_for(
        self, count: int, *, to: Collection[str] | None = None, deadline_s: float = 30.0
    ) -> list[EmailMessage]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        while len(received := self.received(to=to)) < count:
            if loop.time() > deadline:
                raise TimeoutError(f"{len(received)} of {count} emails in {deadline_s}s")
            await asyncio.sleep(0.02)
        return received
