"""Engagement named by ``nudge-contact:<contact id>`` (what the notifier and ingest report
for a contact with no userId) lands on that contact, or on its survivor after a merge; it
claims no identity and sets no userId; an unknown contact's is dropped and counted."""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from prometheus_client import REGISTRY

from nudge_common.events import CONTACT_ACTIVITY, Topic
from nudge_common.tracking import engagement_event
from nudge_devtools.pipeline import read_topic
from nudge_scoring import store
from tests.services.scoring.conftest import T0, ScoringHarness, segment


async def open_email(scoring: ScoringHarness, ws: str, contact_id: uuid.UUID) -> str:
    """An ``Email Opened`` built as ingest builds it for a contact without a userId."""
    message_id = f"open-{uuid.uuid4().hex[:8]}"
    message = engagement_event(
        workspace_id=ws,
        event="Email Opened",
        contact_id=str(contact_id),
        user_id=None,
        properties={"delivery_id": "d-1"},
        message_id=message_id,
        at=T0,
    )
    assert message.envelope.payload["anonymousId"] == f"nudge-contact:{contact_id}"
    await scoring.send(message.envelope)
    return message_id


async def landed_on(scoring: ScoringHarness, ws: str, message_id: str) -> list[uuid.UUID]:
    """The contacts of the message's events row and of its ``contact.activity``."""
    rows = await scoring.rows(
        sa.select(store.events.c.contact_id).where(
            store.events.c.workspace_id == ws, store.events.c.message_id == message_id
        )
    )
    activities = [
        CONTACT_ACTIVITY.parse(e)
        for e in await scoring.messages(ws, CONTACT_ACTIVITY.name)
        if e.payload["message_id"] == message_id
    ]
    return [r.contact_id for r in rows] + [a.contact_id for a in activities]


async def contacts_of(scoring: ScoringHarness, ws: str) -> list[tuple[uuid.UUID, str | None]]:
    rows = await scoring.rows(
        sa.select(store.contacts.c.id, store.contacts.c.user_id).where(
            store.contacts.c.workspace_id == ws
        )
    )
    return sorted((r.id, r.user_id) for r in rows)


async def referenced_identities(scoring: ScoringHarness, ws: str) -> int:
    rows = await scoring.rows(
        sa.select(sa.func.count())
        .select_from(store.identities)
        .where(
            store.identities.c.workspace_id == ws,
            store.identities.c.value.like("nudge-contact:%"),
        )
    )
    return int(rows[0][0])


async def test_an_anonymous_contacts_open_lands_on_that_contact(
    scoring: ScoringHarness, ws: str
) -> None:
    await scoring.send(segment(ws, "page", name="Home", anonymousId="a1"))
    anonymous = await scoring.contact_of(ws, "anonymous_id", "a1")

    message_id = await open_email(scoring, ws, anonymous)
    # the same reference as a userId, and an identify tagging through it
    clicked = segment(ws, event="Email Link Clicked", userId=f"nudge-contact:{anonymous}")
    tagged = segment(
        ws, "identify", anonymousId=f"nudge-contact:{anonymous}", traits={"tags": ["sunset:email"]}
    )
    await scoring.send(clicked, tagged)

    assert await landed_on(scoring, ws, message_id) == [anonymous, anonymous]
    assert await landed_on(scoring, ws, clicked.payload["messageId"]) == [anonymous, anonymous]
    tags = await scoring.rows(
        sa.select(store.tags.c.tag).where(
            store.tags.c.contact_id == anonymous, store.tags.c.active.is_(True)
        )
    )
    assert [t.tag for t in tags] == ["sunset:email"]
    assert await contacts_of(scoring, ws) == [(anonymous, None)]  # no new contact, no userId
    assert await referenced_identities(scoring, ws) == 0


async def test_after_a_merge_the_open_lands_on_the_survivor(
    scoring: ScoringHarness, ws: str
) -> None:
    await scoring.send(
        segment(ws, "identify", userId="u1", traits={"name": "Ann"}),
        segment(ws, "page", name="Home", anonymousId="a1"),
    )
    known = await scoring.contact_of(ws, "user_id", "u1")
    anonymous = await scoring.contact_of(ws, "anonymous_id", "a1")
    # the notifier signed the pixel while the contact was anonymous; then Ann logged in
    await scoring.send(segment(ws, "identify", userId="u1", anonymousId="a1"))
    assert await scoring.contact_of(ws, "anonymous_id", "a1") == known

    message_id = await open_email(scoring, ws, anonymous)

    assert await landed_on(scoring, ws, message_id) == [known, known]
    assert await contacts_of(scoring, ws) == sorted([(known, "u1"), (anonymous, None)])
    assert await referenced_identities(scoring, ws) == 0


async def test_an_unknown_contacts_open_is_dropped_and_counted(
    scoring: ScoringHarness, ws: str
) -> None:
    def dropped() -> float:
        value = REGISTRY.get_sample_value(
            "nudge_scoring_events_dropped_total", {"reason": "unknown_contact"}
        )
        return value or 0.0

    before = dropped()
    erased = uuid.uuid4()
    message_id = await open_email(scoring, ws, erased)
    # a batch with the unknown one among others: the others are applied
    await scoring.send(
        segment(ws, event="Email Opened", anonymousId=f"nudge-contact:{erased}"),
        segment(ws, "page", name="Home", anonymousId="a1"),
    )

    assert dropped() == before + 2
    assert await landed_on(scoring, ws, message_id) == []
    anonymous = await scoring.contact_of(ws, "anonymous_id", "a1")
    assert await contacts_of(scoring, ws) == [(anonymous, None)]
    dead = [
        r
        for r in await read_topic(scoring.settings, Topic.DEAD_LETTER)
        if r.value and message_id.encode() in r.value
    ]
    assert dead == []


async def test_a_malformed_reference_is_dead_lettered(scoring: ScoringHarness, ws: str) -> None:
    bad = segment(ws, event="Email Opened", anonymousId="nudge-contact:not-a-uuid")
    await scoring.send(bad)
    reasons = [
        dict(record.headers)["nudge.reason"].decode()
        for record in await read_topic(scoring.settings, Topic.DEAD_LETTER)
        if record.value and ws.encode() in record.value
    ]
    assert reasons == [
        "anonymousId: 'nudge-contact:not-a-uuid' is not nudge-contact:<contact id> (a UUID)"
    ]
    assert await contacts_of(scoring, ws) == []
