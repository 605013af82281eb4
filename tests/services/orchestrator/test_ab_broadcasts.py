"""A/B broadcasts on the real database and broker: the variants go to a test fraction of
the members, the winner (significant, or the best at ``decide_after_s``) to the rest; a
member never gets two variants or a message twice, across replicas and crashes."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections import Counter
from typing import Any

import pytest
import sqlalchemy as sa

from nudge_common.db import transaction
from nudge_common.events import DELIVERY_REPORTED, NOTIFICATION_REQUESTED, DeliveryReported
from nudge_common.kafka import publish as real_publish
from nudge_orchestrator import store, worker
from nudge_orchestrator.consumer import DeliveryHandler
from nudge_orchestrator.domain.analytics import ab_winner
from nudge_orchestrator.domain.broadcasts import ABTest, choose, in_test
from tests.services.orchestrator.conftest import Broadcasts, Engine, FakeSegmenter, notifications


def test_the_winner_is_the_significant_leader_or_at_the_deadline_the_best_so_far() -> None:
    groups = {"A": (50, 1000), "B": (120, 1000)}
    decided = choose(groups, 0.05, deadline_passed=False)
    assert decided is not None
    assert (decided.winner, decided.reason) == ("B", "significant")
    close = {"A": (50, 1000), "B": (52, 1000)}
    assert choose(close, 0.05, deadline_passed=False) is None, "not yet: ask again later"
    late = choose(close, 0.05, deadline_passed=True)
    assert late is not None
    assert (late.winner, late.reason) == ("B", "deadline")
    tie = choose({"A": (0, 10), "B": (0, 10)}, 0.05, deadline_passed=True)
    assert tie is not None
    assert tie.winner == "A", "a tie (no data) goes to the first"
    nobody = choose({"A": (0, 0), "B": (0, 0)}, 0.05, deadline_passed=True)
    assert nobody is not None
    assert nobody.winner == "A"


def test_variants_are_named_a_b_c_unless_named_and_the_test_group_is_a_fraction() -> None:
    ab = ABTest.model_validate(
        {
            "variants": [
                {"template_id": str(uuid.uuid4())},
                {"name": "bold", "template_id": str(uuid.uuid4())},
                {"template_id": str(uuid.uuid4())},
            ],
            "test_fraction": 0.25,
            "metric": "clicked",
            "decide_after_s": 3600,
        }
    )
    assert [v.name for v in ab.variants] == ["A", "bold", "C"]
    broadcast = uuid.uuid4()
    contacts = [uuid.uuid4() for _ in range(10_000)]
    tested = sum(in_test(broadcast, contact, 0.25) for contact in contacts)
    assert abs(tested - 2500) < 4 * math.sqrt(10_000 * 0.25 * 0.75)
    assert [in_test(broadcast, c, 0.25) for c in contacts[:50]] == [
        in_test(broadcast, c, 0.25) for c in contacts[:50]
    ], "deterministic per contact"


async def _runs(engine: Engine, broadcast: uuid.UUID) -> list[Any]:
    """(run id, contact, variant, send step) of every run of the broadcast."""
    async with transaction(engine.sessionmaker) as session:
        rows = await session.execute(
            sa.select(
                store.runs.c.id,
                store.runs.c.contact_id,
                store.runs.c.variant,
                store.sends.c.step,
            )
            .outerjoin(store.sends, store.sends.c.run_id == store.runs.c.id)
            .where(store.runs.c.workflow_id == broadcast)
        )
        return list(rows)


async def _report(engine: Engine, statuses: list[tuple[uuid.UUID, int, str]]) -> None:
    """The notifier's ``delivery.reported`` for (run, step, status), in one transaction as
    the deliveries consumer applies a batch."""
    async with transaction(engine.sessionmaker) as session:
        await DeliveryHandler().handle_batch(
            session,
            [
                DELIVERY_REPORTED.envelope(
                    workspace_id=engine.workspace_id,
                    payload=DeliveryReported(
                        idempotency_key=f"{run_id}:{step}",
                        channel="email",
                        status=status,
                        contact_id=uuid.uuid4(),
                    ),
                    occurred_at=engine.now,
                )
                for run_id, step, status in statuses
            ],
        )


async def _create(broadcasts: Broadcasts, headers: dict[str, str], body: dict[str, Any]) -> Any:
    created = await broadcasts.api.post(
        "/api/v1/broadcasts",
        json={
            "name": "A/B",
            "channel": "email",
            "send_at": broadcasts.engine.now.isoformat(),
            **body,
        },
        headers=headers,
    )
    assert created.status_code == 201, created.text
    return created.json()


async def _shown(broadcasts: Broadcasts, headers: dict[str, str], broadcast: Any) -> Any:
    answer = await broadcasts.api.get(f"/api/v1/broadcasts/{broadcast}", headers=headers)
    return answer.json()


async def test_the_test_fraction_gets_the_variants_evenly_then_the_rest_the_significant_winner(
    engine: Engine, segments: FakeSegmenter, broadcasts: Broadcasts
) -> None:
    headers = await broadcasts.key("read", "send")
    templates = [await broadcasts.template() for _ in range(3)]
    members = [uuid.uuid4() for _ in range(10_000)]
    segment = uuid.uuid4()
    segments.segments[(engine.workspace_id, segment)] = members
    created = await _create(
        broadcasts,
        headers,
        {
            "segment_id": str(segment),
            "ab_test": {
                "variants": [{"template_id": str(t)} for t in templates],
                "test_fraction": 0.2,
                "metric": "clicked",
                "decide_after_s": 4 * 3600,
            },
        },
    )
    broadcast = uuid.UUID(created["id"])
    assert (created["status"], created["template_id"], created["winner"]) == (
        "scheduled",
        None,
        None,
    )

    assert await broadcasts.drain() == 10_000, "the test pass looks at every member"
    shown = await _shown(broadcasts, headers, broadcast)
    assert shown["status"] == "deciding"
    test_runs = await _runs(engine, broadcast)
    tested = len(test_runs)
    assert shown["test_members"] == shown["members"] == tested
    assert abs(tested - 2000) < 4 * math.sqrt(10_000 * 0.2 * 0.8), tested
    assert {run.contact_id for run in test_runs} == {
        m for m in members if in_test(broadcast, m, 0.2)
    }, "the test group is the members the hash puts in it"
    per_variant = Counter(run.variant for run in test_runs)
    assert set(per_variant) == {"A", "B", "C"}
    for count in per_variant.values():
        assert abs(count - tested / 3) < 4 * math.sqrt(tested / 3 * 2 / 3), per_variant
    step_of = {"A": 1, "B": 2, "C": 3}  # the split, then one send per variant
    assert all(run.step == step_of[run.variant] for run in test_runs)

    # a minute later, nothing reported yet: no winner, asked again a minute later
    engine.advance(seconds=60)
    assert await broadcasts.round() == 0
    assert (await _shown(broadcasts, headers, broadcast))["status"] == "deciding"
    # B's message is clicked by 3 in 10 of its members, the others' by 1 in 20
    clicks: list[tuple[uuid.UUID, int, str]] = []
    for i, run in enumerate(test_runs):
        clicked = i % 10 < 3 if run.variant == "B" else i % 20 == 0
        clicks += [(run.id, run.step, "delivered")] + (
            [(run.id, run.step, "clicked")] if clicked else []
        )
    await _report(engine, clicks)
    report = (
        await broadcasts.api.get(f"/api/v1/broadcasts/{broadcast}/analytics", headers=headers)
    ).json()
    ab = report["ab_test"]
    assert (ab["leader"], ab["significant"], ab["winner"]) == ("B", True, None)
    assert [v["variant"] for v in ab["variants"]] == ["A", "B", "C"]
    assert [v["template_id"] for v in ab["variants"]] == [str(t) for t in templates]
    assert sum(v["entered"] for v in ab["variants"]) == tested
    assert report["remainder"] is None

    assert await broadcasts.round() == 0, "not yet a minute later"
    engine.advance(seconds=60)
    assert await broadcasts.round() == 0, "the decision round"
    shown = await _shown(broadcasts, headers, broadcast)
    assert (shown["status"], shown["winner"], shown["template_id"]) == (
        "sending",
        "B",
        str(templates[1]),
    )
    assert shown["decision"]["reason"] == "significant"
    assert shown["decision"]["p_value"] < 0.05

    assert await broadcasts.drain() == 10_000, "the rest: every member looked at again"
    shown = await _shown(broadcasts, headers, broadcast)
    assert (shown["status"], shown["members"], shown["test_members"]) == ("sent", 10_000, tested)
    runs = await _runs(engine, broadcast)
    assert len(runs) == len({run.contact_id for run in runs}) == 10_000, "one run per member"
    rest = [run for run in runs if run.variant is None]
    assert len(rest) == 10_000 - tested
    assert all(run.step == 0 for run in rest), "the winner's one send"

    messages = [NOTIFICATION_REQUESTED.parse(m) for m in await notifications(engine, broadcast, 60)]
    assert len(messages) == len({m.idempotency_key for m in messages}) == 10_000
    assert len({m.contact.contact_id for m in messages}) == 10_000, "a message per member"
    variant_of = {run.contact_id: run.variant for run in runs}
    templates_of = dict(zip("ABC", templates, strict=True))
    for message in messages:
        variant = variant_of[message.contact.contact_id]
        assert message.template_id == templates_of[variant or "B"]

    report = (
        await broadcasts.api.get(f"/api/v1/broadcasts/{broadcast}/analytics", headers=headers)
    ).json()
    assert (report["entered"], report["requested"]) == (10_000, 10_000)
    assert report["ab_test"]["winner"] == "B"
    assert report["remainder"]["variant"] == "B"
    assert (report["remainder"]["entered"], report["remainder"]["requested"]) == (
        10_000 - tested,
        10_000 - tested,
    )


async def test_at_decide_after_the_best_so_far_wins_on_conversions_to_the_goal(
    engine: Engine, segments: FakeSegmenter, broadcasts: Broadcasts
) -> None:
    headers = await broadcasts.key("read", "send")
    a, b = await broadcasts.template(), await broadcasts.template()
    users = [f"ab-goal-{i}" for i in range(60)]
    contact_of = {user: await engine.contact(user) for user in users}
    segment = uuid.uuid4()
    segments.segments[(engine.workspace_id, segment)] = list(contact_of.values())
    created = await _create(
        broadcasts,
        headers,
        {
            "segment_id": str(segment),
            # (a window beyond the hand clock's other tests: they count fired timers)
            "goal": {"event": "Purchased", "window_s": 300 * 86400},
            "ab_test": {
                "variants": [
                    {"name": "plain", "template_id": str(a)},
                    {"name": "fancy", "template_id": str(b)},
                ],
                "test_fraction": 0.5,
                "metric": "converted",
                "decide_after_s": 3600,
            },
        },
    )
    broadcast = uuid.UUID(created["id"])
    await broadcasts.drain()
    test_runs = await _runs(engine, broadcast)
    assert {run.variant for run in test_runs} == {"plain", "fancy"}
    user_of = {contact: user for user, contact in contact_of.items()}
    # one of fancy's members buys within the window: a lead, far from significant
    buyer = next(run for run in test_runs if run.variant == "fancy")
    await engine.track(user_of[buyer.contact_id], "Purchased")
    engine.advance(seconds=60)
    await broadcasts.round()
    shown = await _shown(broadcasts, headers, broadcast)
    assert (shown["status"], shown["winner"]) == ("deciding", None)
    engine.advance(seconds=3600 - 60)
    await broadcasts.round()
    shown = await _shown(broadcasts, headers, broadcast)
    assert (shown["status"], shown["winner"], shown["template_id"]) == ("sending", "fancy", str(b))
    decision = shown["decision"]
    assert decision["reason"] == "deadline"
    assert decision["p_value"] > 0.05
    fancy = sum(run.variant == "fancy" for run in test_runs)
    assert decision["counts"]["fancy"] == {"did": 1, "members": fancy}

    await broadcasts.drain()
    runs = await _runs(engine, broadcast)
    rest = [run for run in runs if run.variant is None]
    assert len(runs) == 60
    assert len(rest) == 60 - len(test_runs)
    # the rest's runs stay open for the goal's window too
    await engine.track(user_of[rest[0].contact_id], "Purchased")
    report = (
        await broadcasts.api.get(f"/api/v1/broadcasts/{broadcast}/analytics", headers=headers)
    ).json()
    assert report["converted"] == 2
    variants = {v["variant"]: v for v in report["ab_test"]["variants"]}
    assert (variants["fancy"]["converted"], variants["plain"]["converted"]) == (1, 0)
    assert variants["fancy"]["metric_rate"] == round(1 / fancy, 4)
    assert (report["remainder"]["variant"], report["remainder"]["converted"]) == ("fancy", 1)
    assert ab_winner({"fancy": (1, fancy), "plain": (0, 30)}).winner is None


async def test_replicas_and_crashes_never_give_a_member_two_variants_or_two_messages(
    engine: Engine,
    segments: FakeSegmenter,
    broadcasts: Broadcasts,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    headers = await broadcasts.key("read", "send")
    templates = [await broadcasts.template() for _ in range(2)]
    members = [uuid.uuid4() for _ in range(300)]
    segment = uuid.uuid4()
    segments.segments[(engine.workspace_id, segment)] = members
    ids = [
        uuid.UUID(
            (
                await _create(
                    broadcasts,
                    headers,
                    {
                        "segment_id": str(segment),
                        "rate_per_s": 40,
                        "ab_test": {
                            "variants": [{"template_id": str(t)} for t in templates],
                            "test_fraction": 0.3,
                            "metric": "opened",
                            "decide_after_s": 120,
                        },
                    },
                )
            )["id"]
        )
        for _ in range(2)
    ]

    calls = 0
    crashed_steps: set[int | None] = set()

    async def publish_and_sometimes_crash(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        number = calls  # (the other replica's call may count on while this one awaits)
        await real_publish(*args, **kwargs)
        if number % 4 == 1:
            outgoing = args[2]
            crashed_steps.update(NOTIFICATION_REQUESTED.parse(m.envelope).step for m in outgoing)
            raise ConnectionResetError("the replica died before its commit")

    monkeypatch.setattr(worker, "publish", publish_and_sometimes_crash)
    crashed = 0
    for _ in range(200):
        shown = [await _shown(broadcasts, headers, b) for b in ids]
        if all(s["status"] == "sent" for s in shown):
            break
        # two replicas at once: SKIP LOCKED gives each its own broadcast
        rounds = await asyncio.gather(
            *(broadcasts.round() for _ in range(2)), return_exceptions=True
        )
        crashed += sum(isinstance(r, ConnectionResetError) for r in rounds)
        if not any(r for r in rounds if not isinstance(r, BaseException)):
            engine.advance(seconds=30)
    assert all(s["status"] == "sent" for s in shown), shown
    assert crashed >= 4
    assert 0 in crashed_steps, "a page of the rest (the winner's send) crashed"
    assert crashed_steps & {1, 2}, "a page of the test (a variant's send) crashed"

    for broadcast in ids:
        runs = await _runs(engine, broadcast)
        assert len(runs) == len({run.contact_id for run in runs}) == 300
        tested = [run for run in runs if run.variant is not None]
        assert {run.contact_id for run in tested} == {
            m for m in members if in_test(broadcast, m, 0.3)
        }
        messages = [NOTIFICATION_REQUESTED.parse(m) for m in await notifications(engine, broadcast)]
        assert len({m.idempotency_key for m in messages}) == 300, "each member's message once"
        templates_per_member: dict[uuid.UUID, set[uuid.UUID]] = {}
        for message in messages:
            templates_per_member.setdefault(message.contact.contact_id, set()).add(
                message.template_id
            )
        assert len(templates_per_member) == 300
        assert all(len(t) == 1 for t in templates_per_member.values()), "never two variants"
        shown_one = await _shown(broadcasts, headers, broadcast)
        assert shown_one["members"] == 300
        assert shown_one["test_members"] == len(tested)
        assert shown_one["decision"]["reason"] == "deadline"


async def test_the_ab_api_names_the_bad_field_and_a_cancelled_test_sends_no_rest(
    engine: Engine, segments: FakeSegmenter, broadcasts: Broadcasts
) -> None:
    api = broadcasts.api
    headers = await broadcasts.key("read", "send")
    a, b, sms = (
        await broadcasts.template(),
        await broadcasts.template(),
        await broadcasts.template("sms"),
    )
    members = [uuid.uuid4() for _ in range(40)]
    segment = uuid.uuid4()
    segments.segments[(engine.workspace_id, segment)] = members
    ab_test = {
        "variants": [{"template_id": str(a)}, {"template_id": str(b)}],
        "test_fraction": 0.5,
        "metric": "opened",
        "decide_after_s": 600,
    }
    body = {
        "name": "A/B",
        "channel": "email",
        "segment_id": str(segment),
        "send_at": engine.now.isoformat(),
        "ab_test": ab_test,
    }

    async def refused(change: dict[str, Any], *loc: str | int) -> None:
        answer = await api.post("/api/v1/broadcasts", json={**body, **change}, headers=headers)
        assert answer.status_code == 422, answer.text
        locs = [tuple(error["loc"]) for error in answer.json()["detail"]]
        assert ("body", *loc) in locs, locs

    await refused({"template_id": str(a)}, "template_id")  # both
    await refused({"ab_test": None}, "template_id")  # neither
    one = {**ab_test, "variants": ab_test["variants"][:1]}  # type: ignore[index]
    await refused({"ab_test": one}, "ab_test", "variants")
    for fraction in (0, 1):
        await refused(
            {"ab_test": {**ab_test, "test_fraction": fraction}}, "ab_test", "test_fraction"
        )
    await refused({"ab_test": {**ab_test, "metric": "revenue"}}, "ab_test", "metric")
    await refused({"ab_test": {**ab_test, "decide_after_s": 0}}, "ab_test", "decide_after_s")
    unknown = [{"template_id": str(a)}, {"template_id": str(uuid.uuid4())}]
    await refused(
        {"ab_test": {**ab_test, "variants": unknown}}, "ab_test", "variants", 1, "template_id"
    )
    wrong = [{"template_id": str(sms)}, {"template_id": str(a)}]
    await refused(
        {"ab_test": {**ab_test, "variants": wrong}}, "ab_test", "variants", 0, "template_id"
    )
    twins = [{"name": "x", "template_id": str(a)}, {"name": "x", "template_id": str(b)}]
    await refused({"ab_test": {**ab_test, "variants": twins}}, "ab_test")
    await refused({"ab_test": {**ab_test, "metric": "converted"}}, "goal")

    created = await _create(broadcasts, headers, {"segment_id": str(segment), "ab_test": ab_test})
    broadcast = created["id"]
    assert created["ab_test"]["variants"][0]["name"] == "A"
    await broadcasts.drain()
    tested = len(await _runs(engine, uuid.UUID(broadcast)))
    assert (await _shown(broadcasts, headers, broadcast))["status"] == "deciding"
    listed = (await api.get("/api/v1/broadcasts?status=deciding", headers=headers)).json()
    assert [item["id"] for item in listed["items"]] == [broadcast]
    started = await api.patch(
        f"/api/v1/broadcasts/{broadcast}", json={"send_at": engine.now.isoformat()}, headers=headers
    )
    assert started.status_code == 409
    assert "send_at" in started.json()["detail"]
    cancelled = await api.post(f"/api/v1/broadcasts/{broadcast}/cancel", headers=headers)
    assert cancelled.json()["status"] == "cancelled"
    engine.advance(seconds=600)
    await broadcasts.drain()
    shown = await _shown(broadcasts, headers, broadcast)
    assert (shown["status"], shown["winner"]) == ("cancelled", None)
    assert len(await _runs(engine, uuid.UUID(broadcast))) == tested, "no rest after a cancel"
