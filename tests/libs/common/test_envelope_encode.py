"""``Envelope.encode`` writes what the model's own dump gives, byte for byte, for any
payload: consumers decode one format whichever way an envelope was encoded."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from nudge_common import codec
from nudge_common.events import Envelope

leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.uuids()
    | st.datetimes(timezones=st.sampled_from([None, UTC, timezone(timedelta(hours=-5))]))
    | st.dates()
    | st.decimals(allow_nan=False, allow_infinity=False, places=2)
)
payloads: st.SearchStrategy[dict[str, Any]] = st.dictionaries(
    st.text(max_size=6),
    st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
        max_leaves=8,
    ),
    max_size=5,
)


@settings(max_examples=300, deadline=None)
@given(
    payload=payloads,
    occurred_at=st.datetimes(timezones=st.just(UTC)),
    received_at=st.none() | st.datetimes(timezones=st.just(UTC)),
)
def test_encode_equals_the_models_dump(
    payload: dict[str, Any], occurred_at: datetime, received_at: datetime | None
) -> None:
    envelope = Envelope(
        type="test.thing",
        id=uuid.uuid4(),
        occurred_at=occurred_at,
        workspace_id="ws",
        origin_received_at=received_at,
        payload=payload,
    )
    assert envelope.encode() == codec.dumps(envelope)


def test_a_value_orjson_does_not_write_takes_the_models_way() -> None:
    envelope = Envelope(
        type="test.thing",
        id=uuid.uuid4(),
        occurred_at=datetime.now(UTC),
        workspace_id="ws",
        payload={"price": Decimal("9.90"), "tags": {"a"}},
    )
    assert codec.loads(envelope.encode())["payload"] == {"price": "9.90", "tags": ["a"]}
