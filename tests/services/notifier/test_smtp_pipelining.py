"""SMTP transactions with and without PIPELINING (RFC 2920): MAIL, RCPT and DATA in one
write to a server that advertises it, one by one to a server that does not, and every
reply checked in order either way (a refusal maps to the same failure). The provider
alone, against aiosmtpd and against a raw scripted server that holds its replies until
the client has written all three commands."""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import aiosmtplib
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr

from nudge_devtools.services import free_port
from nudge_notifier.domain.templates import Rendered
from nudge_notifier.providers.base import Outbound, PermanentFailure, TransientFailure
from nudge_notifier.providers.email import (
    SmtpEmailProvider,
    _content,
    build_message,
    dkim_sign,
)
from nudge_notifier.settings import NotifierSettings
from tests.services.notifier.fakes import ScriptedSmtp

RENDERED = Rendered("Hello", "<p>Hi</p>", "Hi\n.a line that starts with a dot")


def outbound(to: str, key: str = "k") -> Outbound:
    return Outbound("email", to, RENDERED, key)


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-by-one"])
async def test_refusals_to_rcpt_map_to_the_same_failures_with_and_without_pipelining(
    pipelining: bool,
) -> None:
    server = ScriptedSmtp(pipelining=pipelining)
    server.rcpt_replies["later@example.com"] = ["451 4.3.0 try again later"]
    server.rcpt_replies["gone@example.com"] = ["550 5.1.1 no such user"]
    server.rcpt_replies["policy@example.com"] = ["552 5.7.1 message refused"]
    server.start()
    provider = SmtpEmailProvider(NotifierSettings(smtp_port=server.port))
    try:
        await provider.send(outbound("first@example.com"))
        (connection,) = provider.pool.idle
        assert connection.pipelining is pipelining

        with pytest.raises(TransientFailure) as later:
            await provider.send(outbound("later@example.com"))
        assert later.value.per_recipient
        assert str(later.value) == "451 4.3.0 try again later"

        with pytest.raises(PermanentFailure) as gone:
            await provider.send(outbound("gone@example.com"))
        assert gone.value.hard_bounce

        with pytest.raises(PermanentFailure) as policy:
            await provider.send(outbound("policy@example.com"))
        assert not policy.value.hard_bounce

        # refused for now once: the second try is accepted, on a new connection
        await provider.send(outbound("later@example.com"))
        for i in range(5):
            await provider.send(outbound(f"more-{i}@example.com"))
        assert provider.pool.open == 1, "a connection without errors is reused"
    finally:
        await provider.close()
        server.stop()
    received = [str(m["To"]) for m in server.received()]
    assert received == [
        "first@example.com",
        "later@example.com",
        *(f"more-{i}@example.com" for i in range(5)),
    ]
    (first, *_) = server.received()
    text = first.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert text == RENDERED.text


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_server(ehlo: list[bytes], transaction: Script) -> AsyncIterator[int]:
    """A server that greets, answers EHLO with ``ehlo``, then hands the connection to
    ``transaction``; what it raises fails the test. Leaving waits for every connection's
    script to end."""
    errors: list[BaseException] = []
    served: list[asyncio.Task[None] | None] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.append(asyncio.current_task())
        try:
            writer.write(b"220 raw ESMTP\r\n")
            assert (await reader.readline()).startswith(b"EHLO ")
            writer.write(b"".join(ehlo))
            await transaction(reader, writer)
        except BaseException as error:  # reported by the test
            errors.append(error)
        finally:
            writer.close()

    port = free_port()
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    try:
        yield port
        await asyncio.wait_for(asyncio.gather(*(t for t in served if t)), 5)
    finally:
        server.close()
        await server.wait_closed()
    if errors:
        raise errors[0]


PIPELINING_EHLO = [b"250-raw\r\n", b"250-PIPELINING\r\n", b"250 8BITMIME\r\n"]


async def commands(reader: asyncio.StreamReader, count: int) -> list[bytes]:
    """The next ``count`` command lines, read before any reply is written: a client
    that waits for a reply between them never gets past this (the deadline)."""
    return [await asyncio.wait_for(reader.readline(), 5) for _ in range(count)]


async def content(reader: asyncio.StreamReader) -> bytes:
    lines = []
    while (line := await reader.readline()) != b".\r\n":
        lines.append(line)
    return b"".join(lines)


async def test_mail_rcpt_and_data_go_in_one_write_when_the_server_pipelines() -> None:
    got: list[bytes] = []

    async def transaction(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.extend(await commands(reader, 3))
        writer.write(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go on\r\n")
        got.append(await content(reader))
        writer.write(b"250 2.0.0 queued\r\n")
        assert await reader.readline() == b"QUIT\r\n"
        writer.write(b"221 bye\r\n")

    async with raw_server(PIPELINING_EHLO, transaction) as port:
        provider = SmtpEmailProvider(NotifierSettings(smtp_port=port))
        message_id = await provider.send(outbound("ada@example.com", "key-1"))
        await provider.close()
    mail, rcpt, data, body = got
    assert mail == b"MAIL FROM:<no-reply@nudge.localhost>\r\n"
    assert rcpt == b"RCPT TO:<ada@example.com>\r\n"
    assert data == b"DATA\r\n"
    assert f"Message-ID: {message_id}\r\n".encode() in body
    assert b"X-Nudge-Idempotency-Key: key-1\r\n" in body


async def test_replies_split_across_reads_and_multiline_replies_are_read_in_order() -> None:
    async def transaction(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await commands(reader, 3)
        for part in (b"250 ok\r\n25", b"0-first line\r\n250 second line\r\n", b"354 go\r\n"):
            writer.write(part)
            await writer.drain()
        await content(reader)
        writer.write(b"250 queued\r\n")
        await reader.readline()  # QUIT

    async with raw_server(PIPELINING_EHLO, transaction) as port:
        provider = SmtpEmailProvider(NotifierSettings(smtp_port=port))
        await provider.send(outbound("ada@example.com"))
        await provider.close()


async def test_a_refused_rcpt_sends_no_content_even_if_the_server_accepts_data() -> None:
    """RFC 2920: the client checks every reply; a server that answers DATA with 354
    although it refused the only recipient must not get the message."""
    after_refusal: list[bytes] = []

    async def transaction(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await commands(reader, 3)
        writer.write(b"250 ok\r\n550 5.1.1 no such user\r\n354 go on anyway\r\n")
        after_refusal.append(await reader.read())  # until the client closes

    async with raw_server(PIPELINING_EHLO, transaction) as port:
        provider = SmtpEmailProvider(NotifierSettings(smtp_port=port))
        with pytest.raises(PermanentFailure) as refused:
            await provider.send(outbound("gone@example.com"))
        await provider.close()
    assert refused.value.hard_bounce
    assert after_refusal == [b""], "the connection is closed without the content"
    assert provider.pool.open == 0


async def test_a_refusal_then_a_closed_connection_is_the_refusal_as_one_by_one() -> None:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await commands(reader, 3)
        writer.write(b"421 4.3.2 shutting down\r\n")

    async with raw_server(PIPELINING_EHLO, closing) as port:
        provider = SmtpEmailProvider(NotifierSettings(smtp_port=port))
        with pytest.raises(TransientFailure) as refused:
            await provider.send(outbound("ada@example.com"))
    assert str(refused.value) == "421 4.3.2 shutting down"
    assert refused.value.per_recipient
    assert provider.pool.open == 0


async def test_a_connection_lost_before_the_content_is_transient_and_during_it_unknown() -> None:
    async def lost_before(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await commands(reader, 3)
        writer.write(b"250 ok\r\n250 ok\r\n")

    async with raw_server(PIPELINING_EHLO, lost_before) as port:
        provider = SmtpEmailProvider(NotifierSettings(smtp_port=port))
        with pytest.raises(TransientFailure, match="connection lost before the content"):
            await provider.send(outbound("ada@example.com"))

    async def lost_during(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await commands(reader, 3)
        writer.write(b"250 ok\r\n250 ok\r\n354 go on\r\n")
        await content(reader)

    async with raw_server(PIPELINING_EHLO, lost_during) as port:
        provider = SmtpEmailProvider(NotifierSettings(smtp_port=port))
        # neither transient nor permanent: the outcome is unknown, never retried
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await provider.send(outbound("ada@example.com"))
    assert provider.pool.open == 0


async def test_a_missing_reply_times_out_transient_before_the_content_and_unknown_after() -> None:
    async def silent_before(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await commands(reader, 3)
        writer.write(b"250 ok\r\n")
        assert await reader.read() == b"", "closed by the client on its timeout"

    async with raw_server(PIPELINING_EHLO, silent_before) as port:
        provider = SmtpEmailProvider(NotifierSettings(smtp_port=port, smtp_timeout_s=0.2))
        with pytest.raises(TransientFailure, match="Timed out waiting for a reply"):
            await provider.send(outbound("ada@example.com"))
    assert provider.pool.open == 0

    async def silent_after(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await commands(reader, 3)
        writer.write(b"250 ok\r\n250 ok\r\n354 go on\r\n")
        await content(reader)
        assert await reader.read() == b"", "closed by the client on its timeout"

    async with raw_server(PIPELINING_EHLO, silent_after) as port:
        provider = SmtpEmailProvider(NotifierSettings(smtp_port=port, smtp_timeout_s=0.2))
        with pytest.raises(aiosmtplib.SMTPReadTimeoutError):
            await provider.send(outbound("ada@example.com"))
    assert provider.pool.open == 0


async def test_commands_go_one_by_one_when_the_server_does_not_pipeline() -> None:
    early: list[bytes] = []

    async def transaction(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for reply in (b"250 ok\r\n", b"250 ok\r\n", b"354 go on\r\n"):
            await commands(reader, 1)
            # nothing more may come before this reply (the client waits for it)
            with pytest.raises(TimeoutError):
                early.append(await asyncio.wait_for(reader.readline(), 0.1))
            writer.write(reply)
        await content(reader)
        writer.write(b"250 queued\r\n")
        await reader.readline()  # QUIT

    async with raw_server([b"250-raw\r\n", b"250 8BITMIME\r\n"], transaction) as port:
        provider = SmtpEmailProvider(NotifierSettings(smtp_port=port))
        await provider.send(outbound("ada@example.com"))
        await provider.close()
    assert early == []


def test_the_content_has_crlf_line_ends_only_and_is_dot_stuffed() -> None:
    """The content is not normalised again before DATA: build_message and the DKIM
    signature must write CRLF line ends only."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    settings = NotifierSettings(
        dkim_domain="nudge.localhost", dkim_selector="s1", dkim_private_key=SecretStr(pem)
    )
    rendered = Rendered("Grüße " * 40 + "\r\n.x", "<p>\n.line\r</p>", ".dot\nline\r\n")
    headers = {"List-Unsubscribe": "<http://n/u/" + "t" * 1200 + ">"}
    data, _ = build_message(settings, Outbound("email", "a@example.com", rendered, "k", headers))
    signed = dkim_sign(settings, data)
    assert signed.startswith(b"DKIM-Signature:")
    assert not re.search(rb"\r(?!\n)|(?<!\r)\n", signed)
    wire = _content(b"Subject: x\r\n\r\n.starts with a dot\r\nend\r\n")
    assert wire == b"Subject: x\r\n\r\n..starts with a dot\r\nend\r\n.\r\n"
    assert base64.b64decode(signed.split(b"\r\n\r\n")[2].split(b"\r\n--")[0]) == (
        rendered.text.encode()
    )
