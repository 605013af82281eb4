"""Email over SMTP: a pool of open connections (opened by aiosmtplib: TLS or STARTTLS,
auth), mail transactions pipelined when the server allows it (RFC 2920), Message-ID, RFC
8058 one-click List-Unsubscribe headers and optional DKIM signing."""

from __future__ import annotations

import asyncio
import base64
import functools
import re
import time
import uuid
from collections import deque
from email.header import Header
from email.utils import formataddr, formatdate, parseaddr
from typing import cast

import aiosmtplib
import dkim
from aiosmtplib import SMTPResponse, SMTPStatus
from aiosmtplib.email import quote_address

from nudge_notifier.providers.base import Outbound, PermanentFailure, TransientFailure
from nudge_notifier.settings import NotifierSettings

SIGNED_HEADERS = [
    b"from",
    b"to",
    b"subject",
    b"date",
    b"message-id",
    b"mime-version",
    b"content-type",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
]
HARD_BOUNCE_CODES = frozenset({550, 551, 553, 554})
"""Replies to RCPT that say the mailbox does not exist or will never take mail."""


_UNSAFE = re.compile(r"[\x00-\x1f\x7f]+")
_NOT_IN_A_MAILBOX = re.compile(r'[\s<>"]')
"""What aiosmtplib refuses in an address: it would break the MAIL or RCPT line."""
LINE_LIMIT = 900
"""Fold header lines longer than this (RFC 5322 allows 998 characters)."""


def _header(name: str, value: str) -> bytes:
    """One header line. Control characters become spaces (no header injection). Printable
    ASCII goes as is, folded at spaces when long (so URLs in List-Unsubscribe stay
    intact); anything else, or what looks like an encoded word, is RFC 2047 encoded."""
    if not _printable_ascii(value):
        value = _UNSAFE.sub(" ", value)
    value = value.strip()
    if not _printable_ascii(value) or "=?" in value:
        value = Header(value, "utf-8", header_name=name).encode(linesep="\r\n")
    elif len(name) + len(value) > LINE_LIMIT:
        lines = [f"{name}:"]
        for word in value.split(" "):
            if len(lines[-1]) + len(word) >= LINE_LIMIT:
                lines.append("")
            lines[-1] += f" {word}"
        return ("\r\n".join(lines) + "\r\n").encode()
    return f"{name}: {value}\r\n".encode()


def _printable_ascii(value: str) -> bool:
    """Characters 0x20 to 0x7e only (faster than a regular expression over a long URL)."""
    return value.isascii() and value.isprintable()


@functools.lru_cache(maxsize=1)
def _date_header(second: int) -> bytes:
    """The Date header changes once a second, not with every message."""
    return _header("Date", formatdate(second, usegmt=True))


@functools.lru_cache(maxsize=16)
def _from_header(email_from: str) -> bytes:
    """``formataddr`` already encodes a display name that is not ASCII."""
    value = _UNSAFE.sub(" ", formataddr(parseaddr(email_from), charset="utf-8"))
    return f"From: {value}\r\n".encode()


def _part(content_type: str, text: str) -> bytes:
    return (
        f'Content-Type: {content_type}; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode() + base64.encodebytes(text.encode()).replace(b"\n", b"\r\n")


def build_message(settings: NotifierSettings, outbound: Outbound) -> tuple[bytes, str]:
    """The message as it goes over the wire, and its Message-ID: multipart/alternative
    (text, then HTML), UTF-8, base64 parts, CRLF line ends. Written directly rather than
    through the ``email`` package, whose generator folds every header and compiles a
    regular expression per boundary (most of a send's CPU time). The boundary starts with
    ``=_``, which base64 never produces, so it cannot occur in a part."""
    unique = uuid.uuid4().hex
    message_id = f"<{unique}@{settings.email_domain}>"
    boundary = f"=_{unique}"
    lines = [
        _from_header(settings.email_from),
        _header("To", outbound.to),
        _header("Subject", outbound.rendered.subject),
        _date_header(int(time.time())),
        _header("Message-ID", message_id),
        _header("X-Nudge-Idempotency-Key", outbound.idempotency_key),
        *(_header(name, value) for name, value in outbound.headers.items()),
        b"MIME-Version: 1.0\r\n",
        f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n'.encode(),
    ]
    delimiter = f"--{boundary}\r\n".encode()
    data = b"".join(
        [
            *lines,
            delimiter,
            _part("text/plain", outbound.rendered.text),
            delimiter,
            _part("text/html", outbound.rendered.html),
            f"--{boundary}--\r\n".encode(),
        ]
    )
    return data, message_id


def dkim_sign(settings: NotifierSettings, data: bytes) -> bytes:
    if not (settings.dkim_domain and settings.dkim_selector and settings.dkim_private_key):
        return data
    signature = dkim.sign(
        data,
        settings.dkim_selector.encode(),
        settings.dkim_domain.encode(),
        settings.dkim_private_key.get_secret_value().encode(),
        include_headers=SIGNED_HEADERS,
    )
    return bytes(signature) + data


class SmtpConnection(asyncio.Protocol):
    """One open SMTP connection, taken over from aiosmtplib once it is ready (connected,
    TLS, EHLO, AUTH: aiosmtplib's, unchanged), for the mail transactions.

    aiosmtplib cannot pipeline: its protocol expects one reply per command written and
    awaited, parses one reply per arrival of data and drops data that arrives while a
    parsed reply is not yet picked up. Here every reply is parsed and kept in order, so
    MAIL, RCPT and DATA can go in one write (RFC 2920) and their replies be read after."""

    def __init__(self, transport: asyncio.BaseTransport, *, pipelining: bool, timeout: float):
        self.transport = cast(asyncio.WriteTransport, transport)
        self.pipelining = pipelining
        """The server advertised PIPELINING in its EHLO reply."""
        self.timeout = timeout
        self.replies: deque[SMTPResponse] = deque()
        self.buffer = bytearray()
        self.lines: list[bytes] = []
        """The text of the reply being read, one element a line."""
        self.lost: aiosmtplib.SMTPException | None = None
        self.loop = asyncio.get_running_loop()
        self.waiter: asyncio.Future[None] | None = None
        transport.set_protocol(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        start = 0
        while (end := self.buffer.find(b"\n", start)) != -1:
            line = bytes(self.buffer[start : end + 1])
            start = end + 1
            try:
                code = int(line[:3])
            except ValueError:
                self._fail(aiosmtplib.SMTPResponseException(-1, f"malformed reply {line!r}"))
                return
            self.lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                message = b"\n".join(self.lines).decode("utf-8", "surrogateescape")
                self.replies.append(SMTPResponse(code, message))
                self.lines = []
        del self.buffer[:start]
        if len(self.buffer) > MAX_LINE_LENGTH or len(self.lines) > MAX_REPLY_LINES:
            self._fail(aiosmtplib.SMTPResponseException(-1, "reply too long"))
        self._wake()

    def eof_received(self) -> bool:
        return False  # the transport closes: connection_lost

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost is None:
            self.lost = aiosmtplib.SMTPServerDisconnected("Connection lost")
        self._wake()

    def _fail(self, error: aiosmtplib.SMTPException) -> None:
        self.lost = error
        self.transport.close()
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    @property
    def is_connected(self) -> bool:
        return self.lost is None and not self.transport.is_closing()

    def write(self, data: bytes) -> None:
        if not self.is_connected:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        self.transport.write(data)

    async def reply(self) -> SMTPResponse:
        """The next reply: ``SMTPServerDisconnected`` once the connection is lost,
        ``SMTPReadTimeoutError`` after ``smtp_timeout_s`` without one (the connection is
        then closed). A plain timer, not ``asyncio.timeout``, which cost several times as
        much, two to four times a message."""
        while not self.replies:
            if self.lost is not None:
                raise self.lost
            self.waiter = self.loop.create_future()
            timer = self.loop.call_later(self.timeout, self._expire)
            try:
                await self.waiter
            finally:
                timer.cancel()
        return self.replies.popleft()

    def _expire(self) -> None:
        self._fail(aiosmtplib.SMTPReadTimeoutError("Timed out waiting for a reply"))

    async def quit(self) -> None:
        self.write(b"QUIT\r\n")
        await self.reply()
        self.close()

    def close(self) -> None:
        self.transport.close()


class SmtpPool:
    """Up to ``smtp_max_connections`` open SMTP connections, reused across messages.
    A connection that saw any error is closed, never handed out again."""

    def __init__(self, settings: NotifierSettings) -> None:
        self.settings = settings
        self.idle: list[SmtpConnection] = []
        self.open = 0
        self.condition = asyncio.Condition()

    def _client(self) -> aiosmtplib.SMTP:
        s = self.settings
        return aiosmtplib.SMTP(
            hostname=s.smtp_host,
            port=s.smtp_port,
            username=s.smtp_username,
            password=s.smtp_password.get_secret_value() if s.smtp_password else None,
            use_tls=s.smtp_use_tls,
            start_tls=s.smtp_start_tls,
            validate_certs=s.smtp_validate_certs,
            timeout=s.smtp_timeout_s,
        )

    async def acquire(self) -> SmtpConnection:
        async with self.condition:
            while not self.idle and self.open >= self.settings.smtp_max_connections:
                await self.condition.wait()
            if self.idle:
                return self.idle.pop()
            self.open += 1
        try:
            return await self._connect()
        except BaseException:
            async with self.condition:
                self.open -= 1
                self.condition.notify()
            raise

    async def _connect(self) -> SmtpConnection:
        """Connected, greeted with EHLO (HELO if refused), TLS and AUTH as configured,
        by aiosmtplib."""
        client = self._client()
        try:
            await client.connect()
            if client.is_ehlo_or_helo_needed:
                try:
                    await client.ehlo()
                except aiosmtplib.SMTPHeloError:
                    if not client.is_connected:
                        raise
                    await client.helo()
            transport = client.transport
            if transport is None or not client.is_connected:
                raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        except BaseException:
            client.close()
            raise
        return SmtpConnection(
            transport,
            pipelining=client.supports_extension("pipelining"),
            timeout=self.settings.smtp_timeout_s,
        )

    async def release(self, connection: SmtpConnection, *, reuse: bool) -> None:
        async with self.condition:
            if reuse and connection.is_connected:
                self.idle.append(connection)
            else:
                self.open -= 1
                connection.close()
            self.condition.notify()

    async def close(self) -> None:
        async with self.condition:
            for connection in self.idle:
                try:
                    await asyncio.wait_for(connection.quit(), 1.0)
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    connection.close()
            self.open -= len(self.idle)
            self.idle.clear()


class SmtpEmailProvider:
    name = "smtp"

    def __init__(self, settings: NotifierSettings) -> None:
        self.settings = settings
        self.pool = SmtpPool(settings)
        self.sender = parseaddr(settings.email_from)[1]
        self.mail = b"MAIL FROM:" + quote_address(self.sender).encode("ascii") + b"\r\n"

    async def send(self, message: Outbound) -> str:
        """Hand the message to the SMTP server; returns its Message-ID.

        Everything before the message's content is safe to retry (the server has not got
        the message); a reply to the content is a clear yes or no; a connection lost or a
        timeout while the content is sent or its reply awaited propagates as is, because
        the server may have taken the message: unknown."""
        data, message_id = build_message(self.settings, message)
        data = dkim_sign(self.settings, data)
        try:
            connection = await self.pool.acquire()
        except aiosmtplib.SMTPHeloError as error:
            raise _refusal(error) from error
        except aiosmtplib.SMTPException as error:
            raise TransientFailure(f"cannot connect: {error}") from error
        except OSError as error:
            raise TransientFailure(f"cannot connect: {error!r}") from error
        reuse = False
        try:
            await self._envelope(connection, message.to)
            connection.write(_content(data))
            reply = await connection.reply()
            if reply.code != SMTPStatus.completed:
                raise _data_refusal(reply)
            reuse = True
        finally:
            await self.pool.release(connection, reuse=reuse)
        return message_id

    async def _envelope(self, connection: SmtpConnection, to: str) -> None:
        """MAIL, RCPT and DATA, in one write when the server pipelines (RFC 2920), else
        one by one; returns when the server waits for the content (354). The replies are
        read in order and the first refusal fails the message (4xx: transient), as one by
        one: a 421 to MAIL followed by a closed connection is the 421. The replies after a
        refusal are not read and the connection is closed without the content, so a server
        that answers DATA with 354 although it refused RCPT gets no message. The sender was
        quoted once at start and the recipient checked and normalised before: both are
        written as they stand."""
        if _NOT_IN_A_MAILBOX.search(to):
            raise ValueError(f"{to!r} cannot be sent to: not a plain SMTP mailbox")
        commands = [self.mail, b"RCPT TO:<" + to.encode("ascii") + b">\r\n", b"DATA\r\n"]
        try:
            if connection.pipelining:
                connection.write(b"".join(commands))
            for index, command in enumerate(commands):
                if not connection.pipelining:
                    connection.write(command)
                reply = await connection.reply()
                if reply.code not in _ACCEPTED[index]:
                    raise self._refused(index, reply, to)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as error:
            raise TransientFailure(f"connection lost before the content: {error}") from error

    def _refused(self, index: int, reply: SMTPResponse, to: str) -> Exception:
        """The failure of the message when the server refuses MAIL, RCPT or DATA."""
        if index == 0:
            return _refusal(aiosmtplib.SMTPSenderRefused(reply.code, reply.message, self.sender))
        if index == 1:
            return _refusal(aiosmtplib.SMTPRecipientRefused(reply.code, reply.message, to))
        return _data_refusal(reply)

    async def close(self) -> None:
        await self.pool.close()


_ACCEPTED = (
    (SMTPStatus.completed,),
    (SMTPStatus.completed, SMTPStatus.will_forward),
    (SMTPStatus.start_input,),
)
"""The replies to MAIL, RCPT and DATA that let the transaction go on."""
MAX_LINE_LENGTH = 8192
MAX_REPLY_LINES = 100


def _content(data: bytes) -> bytes:
    """The message as DATA sends it: dot-stuffed, ended by a line with a dot.
    :func:`build_message` writes CRLF line ends only (its parts are base64, its headers
    written or folded with CRLF, control characters in values replaced), so the line
    ends are not normalised again (aiosmtplib's regular expression over the whole
    message cost more than building it); ``tests/.../test_smtp_pipelining.py`` holds
    the output to that."""
    if b"\n." in data:
        data = data.replace(b"\n.", b"\n..")
    return data + b".\r\n"


def _refusal(error: aiosmtplib.SMTPResponseException) -> Exception:
    reason = f"{error.code} {error.message}"
    if 400 <= error.code < 500:
        return TransientFailure(reason, per_recipient=True)
    hard = isinstance(error, aiosmtplib.SMTPRecipientRefused) and (
        error.code in HARD_BOUNCE_CODES or "5.1." in error.message
    )
    return PermanentFailure(reason, hard_bounce=hard)


def _data_refusal(reply: SMTPResponse) -> Exception:
    """A refusal of DATA or of the content: the recipient was accepted, so never a hard
    bounce."""
    reason = f"{reply.code} {reply.message}"
    if 400 <= reply.code < 500:
        return TransientFailure(reason, per_recipient=True)
    return PermanentFailure(reason)
