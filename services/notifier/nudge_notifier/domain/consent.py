"""Whether a message may go to an address: suppression first, then consent. Pure."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from nudge_common.events import Channel, ConsentStatus

ALL_TOPICS = "all"
STOP_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "OPTOUT"})
START_WORDS = frozenset({"START", "UNSTOP", "YES"})


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str | None = None


def decide(
    *,
    channel: Channel,
    topic: str,
    suppression_reason: str | None,
    consents: Mapping[str, ConsentStatus],
    opt_in_channels: Collection[Channel],
) -> Decision:
    """``consents`` maps subscription topics (and ``all``) to this address's status on
    ``channel``. A suppressed address, or one unsubscribed from the topic or from
    everything, is refused; a channel that needs opt-in needs ``subscribed`` on the topic
    or on everything (``pending`` is an unconfirmed double opt-in: not yet)."""
    if suppression_reason is not None:
        return Decision(False, f"suppressed: {suppression_reason}")
    for scope in (ALL_TOPICS, topic):
        if consents.get(scope) == "unsubscribed":
            return Decision(False, f"unsubscribed from {scope}")
    if channel in opt_in_channels and "subscribed" not in (
        consents.get(ALL_TOPICS),
        consents.get(topic),
    ):
        return Decision(False, f"no {channel} consent for {topic}")
    return Decision(True)


def sms_keyword(body: str) -> ConsentStatus | None:
    """What an inbound SMS asks for: STOP-like keywords unsubscribe, START-like ones
    subscribe again; anything else is not a consent change."""
    word = body.strip().upper()
    if word in STOP_WORDS:
        return "unsubscribed"
    if word in START_WORDS:
        return "subscribed"
    return None
