"""The contacts copy follows segment memberships (entered adds, exited removes) and the
notification requests carry the names of the contact's segments, for the templates."""

from __future__ import annotations

import uuid

from nudge_common.db import transaction
from nudge_common.events import (
    NOTIFICATION_REQUESTED,
    SEGMENT_ENTERED,
    SEGMENT_EXITED,
    ContactSnapshot,
    Envelope,
    EventType,
    MembershipChanged,
)
from nudge_orchestrator import store
from nudge_orchestrator.consumer import MembershipHandler
from tests.services.orchestrator.conftest import Engine, notifications

TEMPLATE = uuid.uuid4()


def change(
    engine: Engine,
    kind: EventType[MembershipChanged],
    segment: tuple[uuid.UUID, str],
    contact_id: uuid.UUID,
) -> Envelope:
    return kind.envelope(
        workspace_id=engine.workspace_id,
        payload=MembershipChanged(
            segment_id=segment[0],
            segment_name=segment[1],
            contact=ContactSnapshot(contact_id=contact_id, traits={"email": "x@example.com"}),
            at=engine.now,
        ),
        occurred_at=engine.now,
    )


async def apply_batch(engine: Engine, envelopes: list[Envelope]) -> None:
    async with transaction(engine.sessionmaker) as session:
        await MembershipHandler(engine.clock).handle_batch(session, envelopes)


async def segments_of(engine: Engine, contact_id: uuid.UUID) -> list[str] | None:
    async with transaction(engine.sessionmaker) as session:
        contact = await store.get_contact(session, contact_id=contact_id)
    return None if contact is None else contact["segments"]


async def test_entries_and_exits_update_the_copy(engine: Engine) -> None:
    vip = (uuid.uuid4(), "VIP customers")
    newsletter = (uuid.uuid4(), "Newsletter")
    known = await engine.contact("ada", name="Ada")
    unknown = uuid.uuid4()  # not announced by scoring yet: copied from the snapshot
    await apply_batch(
        engine,
        [
            change(engine, SEGMENT_ENTERED, vip, known),
            change(engine, SEGMENT_ENTERED, vip, unknown),
        ],
    )
    await apply_batch(engine, [change(engine, SEGMENT_ENTERED, newsletter, known)])
    assert await segments_of(engine, known) == ["Newsletter", "VIP customers"]
    assert await segments_of(engine, unknown) == ["VIP customers"]
    async with transaction(engine.sessionmaker) as session:
        copied = await store.get_contact(session, contact_id=unknown)
    assert copied is not None
    assert copied["traits"] == {"email": "x@example.com"}

    # an exit and an entry in one batch; exiting a segment the copy does not have is a no-op
    await apply_batch(
        engine,
        [
            change(engine, SEGMENT_EXITED, vip, known),
            change(engine, SEGMENT_ENTERED, newsletter, unknown),
            change(engine, SEGMENT_EXITED, vip, uuid.uuid4()),
        ],
    )
    assert await segments_of(engine, known) == ["Newsletter"]
    assert await segments_of(engine, unknown) == ["Newsletter", "VIP customers"]
    # scoring's later update keeps the memberships
    await engine.update("ada", {"lead": 5})
    assert await segments_of(engine, known) == ["Newsletter"]
    await apply_batch(engine, [change(engine, SEGMENT_EXITED, newsletter, known)])
    assert await segments_of(engine, known) == []


async def test_a_notification_for_a_member_carries_its_segments(engine: Engine) -> None:
    vip = (uuid.uuid4(), "VIP customers")
    workflow = await engine.workflow(
        {
            "trigger": {"kind": "segment_entered", "segment_id": str(vip[0])},
            "steps": [{"kind": "send", "channel": "email", "template_id": str(TEMPLATE)}],
        }
    )
    contact_id = await engine.contact("grace", name="Grace")
    await engine.apply(
        MembershipHandler(engine.clock), change(engine, SEGMENT_ENTERED, vip, contact_id)
    )
    [message] = await notifications(engine, workflow)
    request = NOTIFICATION_REQUESTED.parse(message)
    assert request.contact.contact_id == contact_id
    assert request.contact.segments == ["VIP customers"]
    assert request.contact.traits["name"] == "Grace"
