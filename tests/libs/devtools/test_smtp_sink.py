"""The SMTP sink's shortcut for plain addresses gives what aiosmtpd's own parse gives, and
the sink takes pipelined commands."""

from __future__ import annotations

import asyncio

from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from nudge_devtools.services import free_port
from nudge_devtools.smtp_sink import SmtpSink, _Smtp

_ATEXT = "abcXYZ019!#$%&'*+/=?^_`{|}~-"
_LOCAL = st.one_of(
    st.text(_ATEXT + ".", min_size=0, max_size=70),
    st.sampled_from(['"quoted x"', "a b", "ü", "a@b"]),
)
_DOMAIN = st.one_of(
    st.text("abcXYZ019-.", min_size=0, max_size=30),
    st.sampled_from(["example.com", "[127.0.0.1]", "bücher.de", "x_y.com"]),
)


@settings(max_examples=1000, deadline=None)
@given(
    local=_LOCAL,
    domain=_DOMAIN,
    before=st.sampled_from(["", " "]),
    after=st.sampled_from(
        ["", " SIZE=1234", "\tBODY=8BITMIME SMTPUTF8", ">", " <x@y>", " (comment) SIZE=1", "x"]
    ),
)
def test_the_shortcut_parses_plain_addresses_as_aiosmtpd_does(
    local: str, domain: str, before: str, after: str
) -> None:
    server = _Smtp(handler=object(), loop=asyncio.new_event_loop())
    arg = f"{before}<{local}@{domain}>{after}"
    assert server._getaddr(arg) == SMTP._getaddr(server, arg)


async def test_the_sink_advertises_pipelining_and_takes_pipelined_commands() -> None:
    sink = SmtpSink(free_port())
    sink.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", sink.port)
        await reader.readline()
        writer.write(b"EHLO me\r\n")
        ehlo = [await reader.readline()]
        while ehlo[-1][3:4] == b"-":
            ehlo.append(await reader.readline())
        assert b"250-PIPELINING\r\n" in ehlo
        writer.write(b"MAIL FROM:<a@b.org>\r\nRCPT TO:<c@d.org>\r\nDATA\r\n")
        replies = [await reader.readline() for _ in range(3)]
        assert [r[:3] for r in replies] == [b"250", b"250", b"354"]
        writer.write(b"Subject: hi\r\n\r\nhello\r\n.\r\n")
        assert (await reader.readline())[:3] == b"250"
        writer.close()
        (message,) = sink.received(to=None)
        assert message["Subject"] == "hi"
        assert sink.arrivals[0][1] == "c@d.org"
    finally:
        sink.stop()
