"""Tracking and unsubscribe links put into an email: the open pixel, click redirects and
the List-Unsubscribe headers (RFC 2369 and RFC 8058 one-click). Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote

from nudge_common.tracking import sign

HREF = re.compile(r"""href=(["'])(https?://[^"']+)\1""", re.IGNORECASE)
BODY_END = re.compile(r"</body>", re.IGNORECASE)


@dataclass(frozen=True)
class LinkContext:
    secret: str
    tracking_url: str
    public_url: str
    email_domain: str
    workspace_id: str
    contact_id: str
    user_id: str | None
    idempotency_key: str
    channel: str
    address: str
    topic: str

    def claims(self, **extra: str) -> dict[str, str | None]:
        return {
            "w": self.workspace_id,
            "c": self.contact_id,
            "u": self.user_id,
            "k": self.idempotency_key,
            "ch": self.channel,
            **extra,
        }


def unsubscribe_token(ctx: LinkContext) -> str:
    return sign(
        ctx.secret,
        {
            "w": ctx.workspace_id,
            "c": ctx.contact_id,
            "ch": ctx.channel,
            "a": ctx.address,
            "t": ctx.topic,
            "k": ctx.idempotency_key,
        },
    )


def unsubscribe_url(ctx: LinkContext, token: str) -> str:
    return f"{ctx.public_url.rstrip('/')}/u/{token}"


def unsubscribe_headers(ctx: LinkContext, token: str) -> dict[str, str]:
    mailto = f"mailto:unsubscribe@{ctx.email_domain}?subject={quote(token)}"
    return {
        "List-Unsubscribe": f"<{unsubscribe_url(ctx, token)}>, <{mailto}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }


def track_html(html: str, ctx: LinkContext, *, opens: bool, clicks: bool) -> str:
    """Rewrite http(s) links through the signed click redirect and add the open pixel."""
    base = ctx.tracking_url.rstrip("/")
    if clicks:

        def rewrite(match: re.Match[str]) -> str:
            quote_char, url = match.group(1), match.group(2)
            if url.startswith(ctx.public_url):  # our own unsubscribe/confirm pages
                return match.group(0)
            token = sign(ctx.secret, ctx.claims(url=url.replace("&amp;", "&")))
            return f"href={quote_char}{base}/t/c/{token}{quote_char}"

        html = HREF.sub(rewrite, html)
    if opens:
        token = sign(ctx.secret, ctx.claims())
        pixel = (
            f'<img src="{base}/t/o/{token}.gif" width="1" height="1" alt="" style="display:none">'
        )
        # Spliced in rather than substituted: a replacement string is parsed as a
        # template, and the pixel is new for every message (its parse was most of a render).
        end = BODY_END.search(html)
        html = html + pixel if end is None else html[: end.start()] + pixel + html[end.start() :]
    return html
