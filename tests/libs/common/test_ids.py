import uuid

from hypothesis import given
from hypothesis import strategies as st

from nudge_common.ids import NUDGE_NAMESPACE, stable_id, stable_id_str


@given(st.lists(st.text(), min_size=1, max_size=4))
def test_stable_id_is_the_uuid5_of_the_joined_parts(parts: list[str]) -> None:
    expected = uuid.uuid5(NUDGE_NAMESPACE, "\x1f".join(parts))
    made = stable_id(*parts)
    assert made == expected
    assert hash(made) == hash(expected)
    assert (made.version, made.variant, made.is_safe) == (5, uuid.RFC_4122, expected.is_safe)
    assert stable_id_str(*parts) == str(expected)
