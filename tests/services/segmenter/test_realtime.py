"""Real-time and time-driven membership, backfill handing over to real time, and static
lists, on the real database and broker (the handlers and the workers' rounds as the
service runs them, with a clock the test moves)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Literal

import sqlalchemy as sa

from nudge_common.db import transaction
from nudge_common.events import SEGMENT_ENTERED
from nudge_segmenter import store
from tests.services.segmenter.conftest import Segmenter

BUYERS = {
    "kind": "event",
    "event": "Order Completed",
    "where": {"kind": "trait", "name": "total", "op": "gte", "value": 50},
    "op": "gte",
    "count": 2,
    "within_days": 30,
}


async def test_behavioural_segment_enters_on_the_event_and_exits_when_the_window_passes(
    segmenter: Segmenter,
) -> None:
    buyers = await segmenter.segment(BUYERS)
    alice, bob = uuid.uuid4(), uuid.uuid4()
    await segmenter.activity(alice, "Order Completed", properties={"total": 80}, revenue=80)
    await segmenter.activity(bob, "Order Completed", properties={"total": 10}, revenue=10)
    assert await segmenter.members(buyers) == set()
    segmenter.advance(days=10)
    out = await segmenter.activity(alice, "Order Completed", properties={"total": 60}, revenue=60)
    await segmenter.activity(bob, "Order Completed", properties={"total": 99}, revenue=99)
    assert [m.envelope.type for m in out] == [SEGMENT_ENTERED.name]
    assert await segmenter.members(buyers) == {alice}

    # Time alone: alice's first order leaves the 30-day window 30 days after it.
    segmenter.advance(days=19, hours=23)
    await segmenter.rechecks()
    assert await segmenter.members(buyers) == {alice}
    segmenter.advance(hours=1)
    assert await segmenter.rechecks() >= 1
    assert await segmenter.members(buyers) == set()
    assert await segmenter.transitions(buyers, 2) == [("entered", alice), ("exited", alice)]


async def test_a_contact_has_one_recheck_at_the_earliest_time_its_segments_ask_for(
    segmenter: Segmenter,
) -> None:
    weekly = await segmenter.segment({"kind": "event", "event": "Signed In", "within_days": 7})
    recent = await segmenter.segment({"kind": "event", "event": "Searched", "within_days": 3})
    dana = uuid.uuid4()
    signed_in = segmenter.now
    await segmenter.activity(dana, "Signed In", at=signed_in)
    assert await due_rechecks(segmenter, dana) == [signed_in + timedelta(days=7)]
    segmenter.advance(days=1)
    searched = segmenter.now
    await segmenter.activity(dana, "Searched", at=searched)
    assert await due_rechecks(segmenter, dana) == [searched + timedelta(days=3)]
    assert await segmenter.members(weekly) == await segmenter.members(recent) == {dana}

    segmenter.advance(days=3, seconds=1)  # the search leaves its window; the week goes on
    assert await segmenter.rechecks() == 1
    assert await segmenter.members(recent) == set()
    assert await segmenter.members(weekly) == {dana}
    assert await due_rechecks(segmenter, dana) == [signed_in + timedelta(days=7)]
    segmenter.advance(days=3)
    assert await segmenter.rechecks() == 1
    assert await segmenter.members(weekly) == set()
    assert await due_rechecks(segmenter, dana) == []


async def due_rechecks(segmenter: Segmenter, contact_id: uuid.UUID) -> list[datetime]:
    async with transaction(segmenter.sessionmaker) as session:
        rows = await session.scalars(
            sa.select(store.rechecks.c.due_at).where(store.rechecks.c.contact_id == contact_id)
        )
        return list(rows)


async def test_last_seen_and_birthday_segments_follow_the_clock(segmenter: Segmenter) -> None:
    dormant = await segmenter.segment({"kind": "last_seen", "op": "more_than", "days": 30})
    birthday = await segmenter.segment(
        {"kind": "date", "name": "birthday", "op": "anniversary_within", "days": 1}
    )
    carol = uuid.uuid4()
    born = (segmenter.now + timedelta(days=3)).date().replace(year=1990)
    await segmenter.update(carol, traits={"birthday": born.isoformat(), "timezone": "Asia/Tokyo"})
    await segmenter.activity(carol, "Page Viewed")
    assert await segmenter.members(dormant) == set()
    assert await segmenter.members(birthday) == set()
    segmenter.advance(days=2)  # the birthday is tomorrow in Tokyo
    await segmenter.rechecks()
    assert await segmenter.members(birthday) == {carol}
    segmenter.advance(days=2)  # the day after the birthday
    await segmenter.rechecks()
    assert await segmenter.members(birthday) == set()
    segmenter.advance(days=26)
    await segmenter.rechecks()
    assert await segmenter.members(dormant) == {carol}
    await segmenter.activity(carol, "Page Viewed")
    assert await segmenter.members(dormant) == set()


async def test_only_the_segments_depending_on_the_change_are_evaluated(
    segmenter: Segmenter,
) -> None:
    by_trait = await segmenter.segment(
        {"kind": "trait", "name": "address.country", "op": "eq", "value": "IT"}
    )
    by_event = await segmenter.segment({"kind": "event", "event": "Demo Requested"})
    dave = uuid.uuid4()
    await segmenter.update(dave, traits={"address": {"country": "IT"}})
    # An event of another name changes no fact the trait segment depends on.
    async with transaction(segmenter.sessionmaker) as session:
        await session.execute(
            sa.update(store.contacts)
            .where(store.contacts.c.contact_id == dave)
            .values(traits={"address": {"country": "FR"}})
        )
    await segmenter.activity(dave, "Demo Requested")
    assert await segmenter.members(by_event) == {dave}
    assert await segmenter.members(by_trait) == {dave}  # not re-evaluated: nothing it uses changed


async def test_segment_of_segments_tags_and_stages(segmenter: Segmenter) -> None:
    vip = await segmenter.segment({"kind": "tag", "tag": "vip", "min_score": 2})
    hot_vip = await segmenter.segment(
        {
            "kind": "all",
            "conditions": [
                {"kind": "segment", "segment_id": str(vip)},
                {"kind": "stage", "model": "lead", "op": "in", "value": ["mql", "sql"]},
            ],
        }
    )
    erin = uuid.uuid4()
    await segmenter.update(
        erin, tags={"vip": 1}, stages={"lead": "sql"}, changed=["tags", "stages"]
    )
    assert await segmenter.members(hot_vip) == set()
    await segmenter.update(erin, tags={"vip": 2}, stages={"lead": "sql"}, changed=["tags"])
    assert await segmenter.members(vip) == {erin}
    assert await segmenter.members(hot_vip) == {erin}
    await segmenter.update(erin, tags={}, stages={"lead": "sql"}, changed=["tags"])
    assert await segmenter.members(hot_vip) == set()
    assert await segmenter.transitions(hot_vip, 2) == [("entered", erin), ("exited", erin)]


async def test_backfill_computes_membership_set_based_and_hands_over_to_real_time(
    segmenter: Segmenter,
) -> None:
    contacts = [uuid.uuid4() for _ in range(250)]
    for index, contact_id in enumerate(contacts):
        await segmenter.update(contact_id, scores={"lead": index})
    segment = await segmenter.segment(
        {"kind": "score", "model": "lead", "op": "gte", "value": 100}, backfill=True
    )
    # While it backfills, a contact changes: real time leaves it to the hand-over.
    await segmenter.update(contacts[0], scores={"lead": 500})
    assert await segmenter.members(segment) == set()
    assert await segmenter.backfill() >= 1
    expected = {contacts[0], *contacts[100:]}
    assert await segmenter.members(segment) == expected
    entered = [c for d, c in await segmenter.transitions(segment, 151) if d == "entered"]
    assert sorted(entered) == sorted(expected)  # each once: none missed, none doubled
    async with transaction(segmenter.sessionmaker) as session:
        row = await store.get_segment(
            session, workspace_id=segmenter.workspace_id, segment_id=segment
        )
    assert row is not None
    assert row.status == "active"
    assert (row.backfill_total, row.backfill_done) == (151, 151)
    # Real time from here on.
    await segmenter.update(contacts[150], scores={"lead": 3})
    assert contacts[150] not in await segmenter.members(segment)


async def test_static_list_changes_publish_and_feed_segments(segmenter: Segmenter) -> None:
    from nudge_common.events import LIST_CHANGED, ListChanged

    static = uuid.uuid4()
    async with transaction(segmenter.sessionmaker) as session:
        await store.create_segment(
            session,
            workspace_id=segmenter.workspace_id,
            segment_id=static,
            name="press",
            condition=None,
            kind="static",
        )
    in_list = await segmenter.segment({"kind": "segment", "segment_id": str(static)})
    frank = uuid.uuid4()
    change = LIST_CHANGED.envelope(
        workspace_id=segmenter.workspace_id,
        payload=ListChanged(list_id=static, contact_id=frank, action="add", at=segmenter.now),
        occurred_at=segmenter.now,
    )
    out = await segmenter.handle(change)
    assert len(out) == 2
    assert await segmenter.members(static) == {frank}
    assert await segmenter.members(in_list) == {frank}
    assert await segmenter.handle(change) == []  # already a member: no second transition


async def test_backfill_schedules_the_time_driven_rechecks(segmenter: Segmenter) -> None:
    recent, older = uuid.uuid4(), uuid.uuid4()
    await segmenter.activity(recent, "Demo Requested", at=segmenter.now - timedelta(days=2))
    await segmenter.activity(older, "Demo Requested", at=segmenter.now - timedelta(days=6))
    segment = await segmenter.segment(
        {"kind": "event", "event": "Demo Requested", "within_days": 7}, backfill=True
    )
    await segmenter.backfill()
    assert await segmenter.members(segment) == {recent, older}
    segmenter.advance(days=1, seconds=1)  # the older request leaves the 7-day window
    await segmenter.rechecks()
    assert await segmenter.members(segment) == {recent}
    segmenter.advance(days=4)
    await segmenter.rechecks()
    assert await segmenter.members(segment) == set()


async def test_a_merge_adds_the_merged_contacts_events_and_orders_to_the_survivor(
    segmenter: Segmenter,
) -> None:
    from nudge_common.events import CONTACT_MERGED, ContactMerged

    twice = await segmenter.segment({"kind": "event", "event": "Viewed Pricing", "count": 2})
    spender = await segmenter.segment(
        {"kind": "value", "metric": "revenue", "op": "gte", "value": 100}
    )
    known, anonymous = uuid.uuid4(), uuid.uuid4()
    await segmenter.activity(known, "Viewed Pricing")
    await segmenter.activity(known, "Order Completed", revenue=60.0)
    await segmenter.activity(anonymous, "Viewed Pricing")
    await segmenter.activity(anonymous, "Order Completed", revenue=50.0)
    assert await segmenter.members(twice) == set()
    merge = CONTACT_MERGED.envelope(
        workspace_id=segmenter.workspace_id,
        payload=ContactMerged(
            survivor_id=known,
            merged_id=anonymous,
            reason="identify",
            identity="anonymous_id:a",
            at=segmenter.now,
        ),
        occurred_at=segmenter.now,
    )
    await segmenter.handle(merge)
    assert await segmenter.members(twice) == {known}
    assert await segmenter.members(spender) == {known}
    # a late activity of the merged id is stale: it re-creates nothing
    assert await segmenter.activity(anonymous, "Viewed Pricing") == []


async def test_consent_from_the_notifier_moves_consent_segments(segmenter: Segmenter) -> None:
    from nudge_common.events import CONSENT_CHANGED, ConsentChanged
    from nudge_segmenter.consumer import ConsentHandler

    emailable = await segmenter.segment({"kind": "consent", "channel": "email"})
    ivy = uuid.uuid4()
    await segmenter.update(ivy, traits={"email": "ivy@example.com"})

    async def consent(status: Literal["subscribed", "unsubscribed"]) -> None:
        envelope = CONSENT_CHANGED.envelope(
            workspace_id=segmenter.workspace_id,
            payload=ConsentChanged(
                channel="email",
                address="ivy@example.com",
                status=status,
                reason="test",
                contact_id=ivy,
                at=segmenter.now,
            ),
            occurred_at=segmenter.now,
        )
        async with transaction(segmenter.sessionmaker) as session:
            await ConsentHandler(segmenter.clock)(session, envelope)

    await consent("subscribed")
    assert await segmenter.members(emailable) == {ivy}
    await consent("unsubscribed")
    assert await segmenter.members(emailable) == set()
