"""Rows as one array per column, in statements built per call (array_rows) and built once
(insert_arrays, array_param), on the real database: JSON values of every shape
arrive as themselves, a None is SQL NULL where the JSON type says so."""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.dialects.postgresql import insert as pg_insert

from nudge_common.db import SessionMaker, array_param, array_rows, insert_arrays

metadata = sa.MetaData()
rows = sa.Table(
    "array_rows_probe",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("label", sa.Text),
    sa.Column("doc", JSONB),
    sa.Column("maybe", JSONB(none_as_null=True)),
    prefixes=["TEMPORARY"],
)
INSERT = insert_arrays(rows, ["id", "label", "doc", "maybe"])
BY_IDS = sa.select(rows).where(rows.c.id == sa.any_(array_param("ids", rows.c.id.type)))

VALUES: list[Any] = [{"a": [1, 2]}, [1, "two", None], "text", 3, None]


async def test_json_values_of_every_shape_and_nulls(sessionmaker: SessionMaker) -> None:
    ids = [uuid.uuid4() for _ in VALUES]
    more = [uuid.uuid4() for _ in VALUES]
    async with sessionmaker() as session, session.begin():
        await session.run_sync(lambda sync: metadata.create_all(sync.connection()))
        await session.execute(
            INSERT, {"id": ids, "label": ["x", None, "y", "z", "w"], "doc": VALUES, "maybe": VALUES}
        )
        per_call = array_rows(
            [
                ("id", rows.c.id.type, more),
                ("label", rows.c.label.type, ["v"] * 5),
                ("doc", rows.c.doc.type, VALUES),
                ("maybe", rows.c.maybe.type, VALUES),
            ]
        )
        await session.execute(
            pg_insert(rows).from_select(["id", "label", "doc", "maybe"], sa.select(*per_call.c))
        )
        for given in (ids, more):
            found = {
                row.id: row
                for row in await session.execute(BY_IDS, {"ids": [*given, uuid.uuid4()]})
            }
            assert [found[i].doc for i in given] == VALUES  # None: JSON null, read as None
            assert [found[i].maybe for i in given] == VALUES
            nulls = await session.scalar(
                sa.select(sa.func.count()).where(
                    rows.c.id == sa.any_(array_param("ids", rows.c.id.type)),
                    rows.c.maybe.is_(None),
                ),
                {"ids": given},
            )
            json_nulls = await session.scalar(
                sa.select(sa.func.count()).where(
                    rows.c.id == sa.any_(array_param("ids", rows.c.id.type)),
                    sa.func.jsonb_typeof(rows.c.doc) == "null",
                ),
                {"ids": given},
            )
            assert (nulls, json_nulls) == (1, 1)
        assert (await session.execute(BY_IDS, {"ids": []})).all() == []
