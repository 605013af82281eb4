"""The contact profile as pure functions: typed common traits, where each trait was
learned (data party, source, when), the first-touch source, and tags."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date, datetime
from typing import Any, Literal

from nudge_common.events import SegmentEvent

DataParty = Literal["zero", "first", "second", "third"]
PARTIES: tuple[DataParty, ...] = ("zero", "first", "second", "third")

COMMON_TRAITS: dict[str, str] = {
    # trait name (Segment spec spelling) -> contacts column
    "name": "name",
    "email": "email",
    "phone": "phone",
    "birthday": "birthday",
    "language": "language",
    "country": "country",
    "city": "city",
    "timezone": "timezone",
    "company": "company",
    "title": "job_title",
}
"""Traits kept in typed columns as well as in the ``traits`` document."""

TAG_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]*(:[a-z0-9][a-z0-9_.-]*)*$")
"""``namespace:value`` (any depth), lower case: ``interest:shoes``, ``lifecycle:vip``."""


def is_valid_tag(tag: str) -> bool:
    return len(tag) <= 200 and TAG_PATTERN.match(tag) is not None


def typed_traits(traits: Mapping[str, Any]) -> dict[str, Any]:
    """The typed columns for ``traits``. A value that does not fit its type (a birthday that
    is not a date) stays in the document only; its column is empty."""
    typed: dict[str, Any] = dict.fromkeys(COMMON_TRAITS.values())
    for trait, column in COMMON_TRAITS.items():
        value = traits.get(trait)
        if trait == "title" and value is None:
            value = traits.get("job_title")
        if trait == "country" and value is None:
            value = _nested(traits, "address", "country")
        if trait == "city" and value is None:
            value = _nested(traits, "address", "city")
        if value is None or value == "":
            continue
        if column == "birthday":
            typed[column] = _as_date(value)
        elif column == "email":
            typed[column] = str(value).strip().lower()
        else:
            typed[column] = str(value)[:500]
    if typed["name"] is None and (traits.get("firstName") or traits.get("lastName")):
        typed["name"] = " ".join(str(traits[k]) for k in ("firstName", "lastName") if traits.get(k))
    return typed


def _nested(traits: Mapping[str, Any], *path: str) -> Any:
    value: Any = traits
    for part in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _as_date(value: Any) -> date | None:
    if isinstance(value, date):
        return value
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).date()
    except ValueError:
        try:
            return date.fromisoformat(str(value))
        except ValueError:
            return None


def trait_source(event: SegmentEvent, *, source: str) -> dict[str, Any]:
    """Where and when traits in ``event`` were learned. Identify traits are first-party
    unless the sender says otherwise in ``context.nudge.party`` (a form's answers are
    zero-party: the person told us)."""
    nudge = event.context.get("nudge")
    party = nudge.get("party") if isinstance(nudge, dict) else None
    return {
        "party": party if party in PARTIES else "first",
        "source": source,
        "learned_at": event.timestamp.isoformat(),
        "message_id": event.message_id,
    }


def learned(
    sources: Mapping[str, Any], changed: Mapping[str, Any], origin: Mapping[str, Any]
) -> dict[str, Any]:
    """``sources`` with ``origin`` recorded for every trait in ``changed``."""
    return {**sources, **{trait: dict(origin) for trait in changed}}


def changed_traits(current: Mapping[str, Any], incoming: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in incoming.items() if current.get(k) != v}


def first_touch(event: SegmentEvent) -> dict[str, Any]:
    """The acquisition source an event carries: UTM campaign, a referral, a referrer, a form,
    a fair or other offline event (``context.nudge.source``), else the event itself."""
    context = event.context
    nudge = context.get("nudge") if isinstance(context.get("nudge"), dict) else {}
    touch: dict[str, Any] = {"at": event.timestamp.isoformat(), "message_id": event.message_id}
    campaign = context.get("campaign")
    raw_page = context.get("page")
    page: dict[str, Any] = raw_page if isinstance(raw_page, dict) else {}
    referrer = context.get("referrer")
    if isinstance(nudge, dict) and nudge.get("source") in ("form", "event", "fair", "import"):
        touch |= {"kind": nudge["source"], "detail": nudge.get("detail")}
    elif isinstance(campaign, dict) and campaign:
        touch |= {"kind": "utm", **{k: v for k, v in campaign.items() if isinstance(v, str)}}
    elif isinstance(referrer, dict) and referrer.get("type"):
        touch |= {"kind": "referral", "referrer": referrer}
    elif page.get("referrer"):
        touch |= {"kind": "referrer", "referrer": page["referrer"]}
    else:
        touch |= {"kind": "event", "type": event.type.value, "name": event.event or event.name}
    return touch


def tags_in(traits: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """Tags an identify call adds (``traits.tags``) and removes (``traits.untags``): the
    valid ones; invalid names are reported by :func:`invalid_tags`."""
    return (
        [t for t in _strings(traits.get("tags")) if is_valid_tag(t)],
        [t for t in _strings(traits.get("untags")) if is_valid_tag(t)],
    )


def invalid_tags(traits: Mapping[str, Any]) -> list[str]:
    return [
        t for key in ("tags", "untags") for t in _strings(traits.get(key)) if not is_valid_tag(t)
    ]


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [str(v) for v in value]
    return []
