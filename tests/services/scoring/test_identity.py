"""Identity resolution on the real broker and database: anonymous browsing then identify
carries history and points over, alias and email merges, later events for a merged-away
identity land on the survivor, and every merge is audited and published."""

from __future__ import annotations

import uuid

import sqlalchemy as sa

from nudge_common.db import transaction
from nudge_common.events import CONTACT_MERGED
from nudge_scoring import store
from nudge_scoring.domain.rules import BehaviouralSpec, Rule
from tests.services.scoring.conftest import ScoringHarness, segment


async def pricing_rule(scoring: ScoringHarness, ws: str, points: int = 10) -> uuid.UUID:
    rule_id = uuid.uuid4()
    async with transaction(scoring.sessionmaker) as session:
        await store.create_rule(
            session,
            workspace_id=ws,
            rule=Rule(rule_id, "lead", None, points, BehaviouralSpec(event="Viewed Pricing")),
        )
    return rule_id


async def events_of(scoring: ScoringHarness, contact_id: uuid.UUID) -> int:
    rows = await scoring.rows(
        sa.select(sa.func.count()).select_from(store.events).where(store.family(contact_id))
    )
    return int(rows[0][0])


async def test_anonymous_browsing_then_identify_carries_history_and_points(
    scoring: ScoringHarness, ws: str
) -> None:
    await pricing_rule(scoring, ws)
    # the known user on another device, and an anonymous visitor browsing
    await scoring.send(
        segment(ws, "identify", userId="u1", traits={"email": "ann@example.com", "name": "Ann"}),
        segment(ws, event="Viewed Pricing", userId="u1"),
        *[segment(ws, event="Viewed Pricing", anonymousId="a1") for _ in range(3)],
        segment(
            ws,
            "page",
            name="Home",
            anonymousId="a1",
            context={"campaign": {"source": "newsletter", "medium": "email"}},
        ),
    )
    known = await scoring.contact_of(ws, "user_id", "u1")
    anonymous = await scoring.contact_of(ws, "anonymous_id", "a1")
    assert known != anonymous
    assert await scoring.scores(anonymous) == {"lead": 30}

    await scoring.send(segment(ws, "identify", userId="u1", anonymousId="a1"))

    assert await scoring.contact_of(ws, "anonymous_id", "a1") == known
    assert await scoring.scores(known) == {"lead": 40}
    assert await events_of(scoring, known) == 7  # 2 + 4 anonymous + the identify
    breakdown = await scoring.rows(
        sa.select(store.score_changes.c.points).where(store.score_changes.c.contact_id == known)
    )
    assert sorted(r.points for r in breakdown) == [10, 10, 10, 10]
    merge = (
        await scoring.rows(sa.select(store.merges).where(store.merges.c.merged_id == anonymous))
    )[0]
    assert (merge.survivor_id, merge.reason, merge.identity) == (
        known,
        "identify",
        "anonymous_id:a1",
    )
    published = await scoring.messages(ws, CONTACT_MERGED.name)
    assert [(m.payload["survivor_id"], m.payload["merged_id"]) for m in published] == [
        (str(known), str(anonymous))
    ]
    contact = (await scoring.rows(sa.select(store.contacts).where(store.contacts.c.id == known)))[0]
    assert contact.first_touch["kind"] == "event"  # the known contact's own first touch stays
    assert contact.email == "ann@example.com"

    # later events for the merged-away anonymous id land on the survivor
    await scoring.send(segment(ws, event="Viewed Pricing", anonymousId="a1"))
    assert await scoring.scores(known) == {"lead": 50}
    merged_row = (
        await scoring.rows(sa.select(store.contacts).where(store.contacts.c.id == anonymous))
    )[0]
    assert merged_row.merged_into == known
    assert await scoring.scores(anonymous) == {}


async def test_identify_of_a_new_user_links_the_anonymous_contact_without_a_merge(
    scoring: ScoringHarness, ws: str
) -> None:
    await pricing_rule(scoring, ws)
    await scoring.send(segment(ws, event="Viewed Pricing", anonymousId="a9"))
    await scoring.send(segment(ws, "identify", userId="u9", anonymousId="a9"))
    contact = await scoring.contact_of(ws, "anonymous_id", "a9")
    assert await scoring.contact_of(ws, "user_id", "u9") == contact
    assert await scoring.scores(contact) == {"lead": 10}
    assert await scoring.messages(ws, CONTACT_MERGED.name) == []


async def test_alias_merges_two_identities(scoring: ScoringHarness, ws: str) -> None:
    await pricing_rule(scoring, ws, points=5)
    await scoring.send(
        segment(ws, event="Viewed Pricing", userId="old-id"),
        segment(ws, event="Viewed Pricing", userId="new-id"),
        segment(ws, event="Viewed Pricing", userId="new-id"),
    )
    old = await scoring.contact_of(ws, "user_id", "old-id")
    new = await scoring.contact_of(ws, "user_id", "new-id")
    await scoring.send(segment(ws, "alias", userId="new-id", previousId="old-id"))
    assert await scoring.contact_of(ws, "user_id", "old-id") == new
    assert await scoring.scores(new) == {"lead": 15}
    merge = (await scoring.rows(sa.select(store.merges).where(store.merges.c.merged_id == old)))[0]
    assert merge.reason == "alias"


async def test_email_merge_only_when_the_workspace_asks_for_it(
    scoring: ScoringHarness, ws: str
) -> None:
    await pricing_rule(scoring, ws)
    await scoring.send(
        segment(ws, event="Viewed Pricing", anonymousId="laptop"),
        segment(ws, "identify", anonymousId="laptop", traits={"email": "Bo@Example.com"}),
        segment(ws, event="Viewed Pricing", anonymousId="phone"),
    )
    laptop = await scoring.contact_of(ws, "anonymous_id", "laptop")
    phone = await scoring.contact_of(ws, "anonymous_id", "phone")
    # off by default: the same email on another contact does not merge
    await scoring.send(segment(ws, "identify", anonymousId="phone", traits={"email": "x@y.z"}))
    assert await scoring.contact_of(ws, "anonymous_id", "phone") == phone

    async with transaction(scoring.sessionmaker) as session:
        await store.put_workspace_settings(session, workspace_id=ws, merge_on_email=True)
    await scoring.send(
        segment(ws, "identify", anonymousId="phone", traits={"email": "bo@example.com"})
    )
    assert await scoring.contact_of(ws, "anonymous_id", "phone") == laptop
    assert await scoring.scores(laptop) == {"lead": 20}
    merge = (await scoring.rows(sa.select(store.merges).where(store.merges.c.merged_id == phone)))[
        0
    ]
    assert (merge.reason, merge.identity) == ("email", "email:bo@example.com")


async def test_two_known_people_sharing_a_device_are_not_merged(
    scoring: ScoringHarness, ws: str
) -> None:
    await scoring.send(
        segment(ws, "identify", userId="alice", anonymousId="shared"),
        segment(ws, "identify", userId="bob"),
    )
    await scoring.send(segment(ws, "identify", userId="bob", anonymousId="shared"))
    assert await scoring.contact_of(ws, "user_id", "alice") != await scoring.contact_of(
        ws, "user_id", "bob"
    )
    assert await scoring.messages(ws, CONTACT_MERGED.name) == []
