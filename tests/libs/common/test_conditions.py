from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from nudge_common.conditions import Profile, condition_adapter, matches

PROFILE = Profile(traits={"country": "IT", "plan": "pro", "tags": ["shoes"]}, scores={"lead": 60})


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ({"kind": "score", "model": "lead", "op": "gte", "value": 50}, True),
        ({"kind": "score", "model": "lead", "op": "gte", "value": 61}, False),
        ({"kind": "score", "model": "fit", "op": "gte", "value": 1}, False),
        ({"kind": "trait", "name": "country", "op": "eq", "value": "IT"}, True),
        ({"kind": "trait", "name": "country", "op": "in", "value": ["FR", "DE"]}, False),
        ({"kind": "trait", "name": "tags", "op": "contains", "value": "shoes"}, True),
        ({"kind": "trait", "name": "plan", "op": "starts_with", "value": "pr"}, True),
        ({"kind": "trait", "name": "phone", "op": "exists"}, False),
        ({"kind": "trait", "name": "phone", "op": "neq", "value": "x"}, True),
        ({"kind": "trait", "name": "country", "op": "gt", "value": 3}, False),
        (
            {
                "kind": "all",
                "conditions": [
                    {"kind": "score", "model": "lead", "op": "gte", "value": 50},
                    {
                        "kind": "not",
                        "condition": {
                            "kind": "trait",
                            "name": "country",
                            "op": "eq",
                            "value": "FR",
                        },
                    },
                    {
                        "kind": "any",
                        "conditions": [
                            {"kind": "trait", "name": "plan", "op": "eq", "value": "free"},
                            {"kind": "trait", "name": "plan", "op": "eq", "value": "pro"},
                        ],
                    },
                ],
            },
            True,
        ),
    ],
)
def test_conditions(condition: dict[str, Any], expected: bool) -> None:
    assert matches(condition_adapter.validate_python(condition), PROFILE) is expected


@pytest.mark.parametrize(
    "condition",
    [
        {"kind": "score", "model": "lead", "op": "about", "value": 50},
        {"kind": "all", "conditions": []},
        {"kind": "nope"},
        {"kind": "trait", "name": "", "op": "eq", "value": 1},
    ],
)
def test_bad_definitions_are_refused(condition: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        condition_adapter.validate_python(condition)
