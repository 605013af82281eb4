"""Contacts from CSV: each row becomes an ``identify`` call, checked field by field.

The first line names the columns. ``user_id`` and/or ``email`` identify the person (a row
needs one of them; an email-only row is identified by the anonymous id ``email:<email>``);
``tags`` holds tag names separated by ``|``; every other column is a trait (``title`` is
the job title, as in Segment). Empty cells are left out. A row's message id derives from
the workspace and the row's content, so importing the same file again is recognised as the
same calls and changes nothing. Pure functions: no database, no Kafka.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from nudge_common.ids import stable_id
from nudge_scoring.domain.profile import PARTIES, is_valid_tag

IDENTITY_COLUMNS = ("user_id", "email")
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
MAX_FIELD = 2000


class CsvError(ValueError):
    """The file as a whole cannot be imported (no header, no identity column)."""


@dataclass(frozen=True)
class RowError:
    row: int
    """1-based line number in the file (the header is line 1)."""
    field: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"row": self.row, "field": self.field, "message": self.message}


def header(text: str) -> list[str]:
    """The columns, checked: names are lower-case snake case after trimming, unique, and
    include an identity column."""
    first = next(csv.reader(io.StringIO(text)), None)
    if not first or not any(c.strip() for c in first):
        raise CsvError("the file has no header line naming its columns")
    columns = [c.strip().lower() for c in first]
    if len(set(columns)) != len(columns):
        raise CsvError(f"duplicate column names in {columns}")
    if not any(c in IDENTITY_COLUMNS for c in columns):
        raise CsvError("the header needs a user_id or an email column")
    return columns


def count_rows(text: str) -> int:
    return max(sum(1 for _ in csv.reader(io.StringIO(text))) - 1, 0)


def rows(text: str, start: int, limit: int) -> list[tuple[int, dict[str, str]]]:
    """(line number, cells) of data rows ``start`` .. ``start + limit`` (0-based)."""
    columns = header(text)
    reader = csv.reader(io.StringIO(text))
    next(reader)
    found = []
    for index, cells in enumerate(reader):
        if index < start:
            continue
        if index >= start + limit:
            break
        padded = [*cells, *[""] * (len(columns) - len(cells))]
        found.append((index + 2, dict(zip(columns, padded, strict=False))))
    return found


def identify_call(
    workspace_id: str, line: int, cells: dict[str, str], *, party: str, at: datetime
) -> tuple[dict[str, Any] | None, list[RowError]]:
    """The Segment ``identify`` call a row makes, or the errors that keep it out."""
    errors: list[RowError] = []
    values = {k: v.strip() for k, v in cells.items() if k and v and v.strip()}
    for key, value in values.items():
        if len(value) > MAX_FIELD or "\x00" in value:
            errors.append(RowError(line, key, f"longer than {MAX_FIELD} characters or has NUL"))
    user_id = values.pop("user_id", None)
    email = values.get("email")
    if email is not None:
        email = email.lower()
        values["email"] = email
        if not EMAIL.match(email):
            errors.append(RowError(line, "email", f"{email!r} is not an email address"))
    if not user_id and not email:
        errors.append(RowError(line, "user_id", "the row has neither user_id nor email"))
    if "birthday" in values:
        try:
            date.fromisoformat(values["birthday"])
        except ValueError:
            errors.append(RowError(line, "birthday", "not a date (YYYY-MM-DD)"))
    tags = [t.strip() for t in values.pop("tags", "").split("|") if t.strip()]
    bad_tags = [t for t in tags if not is_valid_tag(t)]
    if bad_tags:
        errors.append(
            RowError(line, "tags", f"{bad_tags[0]!r} is not a tag name (e.g. interest:shoes)")
        )
    if errors:
        return None, errors
    traits: dict[str, Any] = dict(values)
    if tags:
        traits["tags"] = tags
    content = json.dumps([user_id, traits], sort_keys=True)
    call: dict[str, Any] = {
        "type": "identify",
        "messageId": f"import-{stable_id(workspace_id, 'import', content)}",
        "traits": traits,
        "context": {"nudge": {"source": "import", "party": party}},
        "timestamp": at.isoformat(),
        "receivedAt": at.isoformat(),
    }
    if user_id:
        call["userId"] = user_id
    else:
        call["anonymousId"] = f"email:{email}"
    return call, []


def valid_party(party: str) -> bool:
    return party in PARTIES
