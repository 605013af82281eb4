"""Property: for random contacts, events and definitions, the membership the real-time
path holds after the contacts' changes and events went through it one by one equals a
from-scratch evaluation of the same definition, both in Python (``evaluate`` over the
contact's whole state) and set-based in SQL (the backfill's compiled condition); and SQL
never schedules a time-driven recheck later than Python."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nudge_common.conditions import condition_adapter, evaluate
from nudge_common.db import transaction
from nudge_segmenter import store
from nudge_segmenter.evaluation import ContactBatch
from nudge_segmenter.sql import compile_condition
from tests.conftest import StackHandle
from tests.services.segmenter.conftest import Segmenter, running_segmenter

ZONES = ["Europe/Rome", "America/New_York", "Asia/Tokyo", "Not/AZone", ""]
DATES = [
    "1990-03-11",
    "1984-02-29",
    "2031-03-01",
    "2031-04-02",
    "2031-13-01",
    "soon",
    "2030-03-10T23:30:00+01:00",
]
SCALARS = st.one_of(
    st.sampled_from(["IT", "FR", "it", "pro", "free", "", "é"]),
    st.integers(-3, 3),
    st.sampled_from([0.5, 2.0, True, False, None]),
)
TRAIT_NAMES = ["country", "plan", "n", "address.city"]

trait_leaf = st.builds(
    lambda name, op, value: {"kind": "trait", "name": name, "op": op, "value": value},
    st.sampled_from(TRAIT_NAMES),
    st.sampled_from(["eq", "neq", "gt", "gte", "lt", "lte", "contains", "starts_with"]),
    st.sampled_from(["IT", "pr", 1, 2.5, True, "é"]),
)
leaf = st.one_of(
    trait_leaf.filter(
        lambda c: not (c["op"] == "starts_with" and not isinstance(c["value"], str))
    ).filter(
        lambda c: not (c["op"] in ("gt", "gte", "lt", "lte") and isinstance(c["value"], bool))
    ),
    st.builds(
        lambda name: {"kind": "trait", "name": name, "op": "exists"}, st.sampled_from(TRAIT_NAMES)
    ),
    st.builds(
        lambda values: {"kind": "trait", "name": "country", "op": "in", "value": values},
        st.lists(st.sampled_from(["IT", "FR", 1, True]), max_size=3),
    ),
    st.builds(
        lambda op, value: {"kind": "score", "model": "lead", "op": op, "value": value},
        st.sampled_from(["eq", "neq", "gte", "lt"]),
        st.integers(-5, 20),
    ),
    st.builds(
        lambda tag, n: {"kind": "tag", "tag": tag, "min_score": n},
        st.sampled_from(["vip", "churned"]),
        st.integers(1, 3),
    ),
    st.builds(
        lambda op, value: {"kind": "stage", "model": "lead", "op": op, "value": value},
        st.sampled_from(["eq", "neq"]),
        st.sampled_from(["mql", "sql"]),
    ),
    st.builds(
        lambda event, op, count, days, where: {
            "kind": "event",
            "event": event,
            "op": op,
            "count": count,
            "within_days": days,
            **({"where": where} if where else {}),
        },
        st.sampled_from(["A", "B"]),
        st.sampled_from(["gte", "lte", "eq"]),
        st.integers(0, 3),
        st.sampled_from([None, 1, 7, 30]),
        st.sampled_from([None, {"kind": "trait", "name": "sku", "op": "eq", "value": "x"}]),
    ),
    st.builds(
        lambda op, days: {"kind": "last_seen", "op": op, "days": days},
        st.sampled_from(["more_than", "less_than"]),
        st.integers(0, 40),
    ),
    st.builds(
        lambda op, days: {"kind": "date", "name": "birthday", "op": op, "days": days},
        st.sampled_from(["within_last", "within_next", "anniversary_within"]),
        st.integers(0, 40),
    ),
    st.builds(
        lambda op, value: {"kind": "date", "name": "birthday", "op": op, "value": value},
        st.sampled_from(["before", "after"]),
        st.sampled_from(["1990-01-01", "2031-03-20"]),
    ),
    st.builds(
        lambda op, value: {"kind": "age", "op": op, "value": value},
        st.sampled_from(["gte", "lt", "eq"]),
        st.integers(0, 50),
    ),
    st.builds(
        lambda metric, op, value: {"kind": "value", "metric": metric, "op": op, "value": value},
        st.sampled_from(["revenue", "orders", "average_order_value"]),
        st.sampled_from(["gte", "lt", "neq"]),
        st.sampled_from([0, 1, 50.0]),
    ),
    st.builds(
        lambda channel: {"kind": "consent", "channel": channel}, st.sampled_from(["email", "sms"])
    ),
)
conditions = st.recursive(
    leaf,
    lambda children: st.one_of(
        st.builds(
            lambda c: {"kind": "all", "conditions": c}, st.lists(children, min_size=1, max_size=3)
        ),
        st.builds(
            lambda c: {"kind": "any", "conditions": c}, st.lists(children, min_size=1, max_size=3)
        ),
        st.builds(lambda c: {"kind": "not", "condition": c}, children),
    ),
    max_leaves=5,
)
traits = st.fixed_dictionaries(
    {},
    optional={
        "country": SCALARS,
        "plan": SCALARS,
        "n": SCALARS,
        "address": st.fixed_dictionaries({}, optional={"city": SCALARS}),
        "birthday": st.sampled_from(DATES),
        "timezone": st.sampled_from(ZONES),
    },
)
step = st.one_of(
    st.tuples(
        st.just("update"),
        traits,
        st.integers(-5, 20),
        st.dictionaries(st.sampled_from(["vip", "churned"]), st.integers(1, 3), max_size=2),
        st.sampled_from([{}, {"lead": "mql"}, {"lead": "sql"}]),
    ),
    st.tuples(
        st.just("event"),
        st.sampled_from(["A", "B", "Order Completed"]),
        st.integers(-45, 2),  # days relative to now
        st.sampled_from([{}, {"sku": "x"}, {"sku": "y"}]),
    ),
    st.tuples(st.just("advance"), st.integers(0, 20)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    definitions=st.lists(conditions, min_size=1, max_size=3),
    contacts=st.lists(st.lists(step, min_size=1, max_size=6), min_size=1, max_size=4),
)
def test_real_time_membership_equals_from_scratch_evaluation(
    stack: StackHandle, definitions: list[dict[str, Any]], contacts: list[list[Any]]
) -> None:
    asyncio.run(_check(stack, definitions, contacts))


async def _check(
    stack: StackHandle, definitions: list[dict[str, Any]], contacts: list[list[Any]]
) -> None:
    async with running_segmenter(stack) as segmenter:
        await _compare(segmenter, definitions, contacts)


async def _compare(
    segmenter: Segmenter, definitions: list[dict[str, Any]], contacts: list[list[Any]]
) -> None:
    segment_ids = [await segmenter.segment(d) for d in definitions]
    ids = [uuid.uuid4() for _ in contacts]
    for contact_id, steps in zip(ids, contacts, strict=True):
        await segmenter.update(contact_id)
        for kind, *args in steps:
            if kind == "update":
                trait_values, score, tags, stages = args
                await segmenter.update(
                    contact_id,
                    traits=trait_values,
                    scores={"lead": score},
                    tags=tags,
                    stages=stages,
                    changed=["traits", "scores", "tags", "stages"],
                )
            elif kind == "event":
                name, days, properties = args
                revenue = 30.0 if name == "Order Completed" else None
                await segmenter.activity(
                    contact_id,
                    name,
                    at=segmenter.now + timedelta(days=days),
                    properties=properties,
                    revenue=revenue,
                )
            else:
                segmenter.advance(days=args[0])
                await segmenter.rechecks()
    await segmenter.rechecks()
    now = segmenter.now
    async with transaction(segmenter.sessionmaker) as session:
        for segment_id, definition in zip(segment_ids, definitions, strict=True):
            condition = condition_adapter.validate_python(definition)
            compiled = compile_condition(condition, now)
            rows = await session.execute(
                sa.select(
                    store.contacts.c.contact_id,
                    compiled.matches,
                    *([compiled.recheck_at] if compiled.recheck_at is not None else []),
                ).where(store.contacts.c.workspace_id == segmenter.workspace_id)
            )
            by_sql = {row[0]: (row[1], row[2] if len(row) > 2 else None) for row in rows}
            members = await segmenter.members(segment_id)
            batch = await ContactBatch.load(session, segmenter.workspace_id, ids)
            for contact_id in ids:
                profile = batch.contacts[contact_id].profile()
                verdict = evaluate(condition, profile, now)
                context = (definition, contact_id, profile)
                assert by_sql[contact_id][0] == verdict.matches, context
                # SQL's recheck (the earliest of every timed leaf) is never later than
                # Python's, which skips leaves that cannot matter any more
                sql_recheck = by_sql[contact_id][1]
                if verdict.recheck_at is not None:
                    assert sql_recheck is not None, context
                    assert sql_recheck <= verdict.recheck_at, context
                assert (contact_id in members) == verdict.matches, context
