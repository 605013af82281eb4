"""Property: for any sequence of events, the score PostgreSQL holds after the scoring
handler applied them one by one equals the score of a plain in-memory reference of the same
rules (caps per day and for ever, negative points, transactional and profile rules)."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nudge_common.db import create_engine, create_sessionmaker, transaction
from nudge_scoring import store
from nudge_scoring.consumer import handle_event
from nudge_scoring.domain.rules import (
    BehaviouralSpec,
    Filter,
    ProfileSpec,
    Rule,
    TransactionalSpec,
)
from tests.conftest import StackHandle
from tests.services.scoring.conftest import T0, segment

RULES: list[tuple[int, Any]] = [
    (5, BehaviouralSpec(event="A", cap_per_day=10)),
    (-3, BehaviouralSpec(event="B")),
    (
        2,
        BehaviouralSpec(
            type="page",
            filters=[Filter(field="properties.url", op="contains", value="/pricing")],
            cap_ever=6,
        ),
    ),
    (10, TransactionalSpec(min_value=50)),
    (4, TransactionalSpec(repeat=True)),
    (8, ProfileSpec(trait="plan", op="eq", value="pro")),
]

Step = tuple[str, int, Any]  # kind, day, argument
steps = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["A", "B"]), st.integers(0, 2), st.none()),
        st.tuples(st.just("page"), st.integers(0, 2), st.sampled_from(["/pricing", "/blog"])),
        st.tuples(st.just("order"), st.integers(0, 2), st.integers(0, 120)),
        st.tuples(st.just("identify"), st.integers(0, 2), st.sampled_from(["pro", "free"])),
    ),
    max_size=14,
)


def reference(sequence: list[Step]) -> int:
    score, orders, held = 0, 0, 0
    spent: dict[tuple[str, Any], int] = defaultdict(int)

    def capped(key: tuple[str, Any], points: int, cap: int) -> int:
        given = max(min(points, cap - spent[key]), 0)
        spent[key] += given
        return given

    for kind, day, argument in sequence:
        if kind == "A":
            score += capped(("A", day), 5, 10)
        elif kind == "B":
            score -= 3
        elif kind == "page" and argument == "/pricing":
            score += capped(("pricing", None), 2, 6)
        elif kind == "order":
            score += (10 if argument >= 50 else 0) + (4 if orders else 0)
            orders += 1
        elif kind == "identify":
            target = 8 if argument == "pro" else 0
            score, held = score + target - held, target
    return score


def envelope_of(workspace_id: str, step: Step) -> Any:
    kind, day, argument = step
    at = T0 + timedelta(days=day)
    if kind in ("A", "B"):
        return segment(workspace_id, event=kind, userId="p", at=at)
    if kind == "page":
        return segment(workspace_id, "page", userId="p", properties={"url": argument}, at=at)
    if kind == "order":
        return segment(
            workspace_id,
            event="Order Completed",
            userId="p",
            properties={"revenue": argument},
            at=at,
        )
    return segment(workspace_id, "identify", userId="p", traits={"plan": argument}, at=at)


async def persisted_score(stack: StackHandle, sequence: list[Step]) -> int:
    engine = create_engine(stack.settings)
    sessionmaker = create_sessionmaker(engine)
    workspace_id = f"prop-{uuid.uuid4().hex[:10]}"
    try:
        async with transaction(sessionmaker) as session:
            for points, spec in RULES:
                await store.create_rule(
                    session,
                    workspace_id=workspace_id,
                    rule=Rule(uuid.uuid4(), "m", None, points, spec),
                )
        for step in sequence:
            async with transaction(sessionmaker) as session:
                await handle_event(session, envelope_of(workspace_id, step))
        async with transaction(sessionmaker) as session:
            found = await store.identities_of(
                session, workspace_id=workspace_id, keys=[("user_id", "p")]
            )
            if not found:
                return 0
            return (await store.scores_of(session, contact_id=found[("user_id", "p")])).get("m", 0)
    finally:
        await engine.dispose()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequence=steps)
def test_persisted_score_equals_the_in_memory_reference(
    stack: StackHandle, sequence: list[Step]
) -> None:
    assert asyncio.run(persisted_score(stack, sequence)) == reference(sequence)
