"""The Parquet exports of `replay-tools export`, opened as they are with pyarrow and DuckDB.

Run by tests/tests/export.rs, which passes the files and the rows it expects (from what it did
and a plain SQL read of the store) in EXPORT_* variables:

- EXPORT_ALL_PARQUET / EXPORT_ALL_EXPECTED: every event, in recorded order;
- EXPORT_TYPED_PARQUET / EXPORT_TYPED_EXPECTED: OrderPlaced only, with typed payload columns.

A missing package or variable fails (never skips).
"""

import json
import os
from datetime import datetime, timedelta, timezone

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

COLUMNS = [
    "event_id", "aggregate_type", "aggregate_id", "sequence", "event_type", "event_version",
    "occurred_at", "recorded_at", "correlation_id", "causation_id", "actor", "command_id",
    "payload",
]
TIMESTAMPS = {"occurred_at", "recorded_at"}
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def setting(name):
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: these tests are run by tests/tests/export.rs")
    return value


def expected_rows(name):
    with open(setting(name), encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def micros(text):
    """RFC 3339 text to microseconds since the epoch (None stays None)."""
    if text is None:
        return None
    return (datetime.fromisoformat(text) - EPOCH) // timedelta(microseconds=1)


def comparable(row):
    """An expected row as the readers give it back: timestamps in microseconds."""
    return {c: micros(row[c]) if c in TIMESTAMPS else row[c] for c in COLUMNS}


def quoted(path):
    return "'" + path.replace("'", "''") + "'"


# ---------------------------------------------------------------------------------------------
# pyarrow


def arrow_rows(table):
    columns = {}
    for name in COLUMNS:
        column = table.column(name)
        if name in TIMESTAMPS:
            column = column.cast(pa.int64())
        columns[name] = column.to_pylist()
    rows = [dict(zip(COLUMNS, values)) for values in zip(*(columns[c] for c in COLUMNS))]
    for row in rows:
        row["payload"] = json.loads(row["payload"])
    return rows


def test_pyarrow_reads_every_event_with_proper_column_types():
    table = pq.read_table(setting("EXPORT_ALL_PARQUET"))
    schema = table.schema
    assert schema.names == COLUMNS
    assert schema.field("event_id").type == pa.string()
    assert schema.field("sequence").type == pa.int64()
    assert schema.field("recorded_at").type == pa.timestamp("us", tz="UTC")
    assert schema.field("occurred_at").type == pa.timestamp("us", tz="UTC")
    assert schema.field("payload").type == pa.string()
    assert not schema.field("recorded_at").nullable
    assert schema.field("actor").nullable

    expected = [comparable(row) for row in expected_rows("EXPORT_ALL_EXPECTED")]
    assert arrow_rows(table) == expected

    metadata = pq.read_metadata(setting("EXPORT_ALL_PARQUET")).metadata
    assert metadata[b"backbone.export.complete"] == b"true"
    assert metadata[b"backbone.export.rows"] == str(len(expected)).encode()


def test_pyarrow_reads_the_typed_payload_columns_of_one_event_type():
    table = pq.read_table(setting("EXPORT_TYPED_PARQUET"))
    schema = table.schema
    assert schema.names[: len(COLUMNS)] == COLUMNS
    assert schema.field("payload_total_minor").type == pa.int64()
    assert schema.field("payload_rating_window_days").type == pa.int32()
    assert schema.field("payload_free_delivery").type == pa.bool_()
    assert schema.field("payload_placed_at").type == pa.timestamp("us", tz="UTC")
    assert schema.field("payload_region").type == pa.string()

    expected = expected_rows("EXPORT_TYPED_EXPECTED")
    assert arrow_rows(table) == [comparable(row) for row in expected]
    placed_at = table.column("payload_placed_at").cast(pa.int64()).to_pylist()
    for i, row in enumerate(expected):
        payload = row["payload"]
        assert table.column("payload_customer_id")[i].as_py() == payload["customer_id"]
        assert table.column("payload_region")[i].as_py() == payload["region"]
        assert table.column("payload_total_minor")[i].as_py() == payload["total"]["minor"]
        assert table.column("payload_total_currency")[i].as_py() == payload["total"]["currency"]
        assert table.column("payload_free_delivery")[i].as_py() == payload["free_delivery"]
        assert json.loads(table.column("payload_lines")[i].as_py()) == payload["lines"]
        assert placed_at[i] == micros(payload["placed_at"])


# ---------------------------------------------------------------------------------------------
# DuckDB


def duckdb_types(path):
    described = duckdb.connect().execute(f"DESCRIBE SELECT * FROM read_parquet({quoted(path)})")
    return {name: kind for name, kind, *_ in described.fetchall()}


def duckdb_rows(path):
    select = ", ".join(f"epoch_us({c})" if c in TIMESTAMPS else c for c in COLUMNS)
    result = duckdb.connect().execute(
        f"SELECT {select} FROM read_parquet({quoted(path)}) "
        "ORDER BY recorded_at, aggregate_type, aggregate_id, sequence"
    )
    rows = [dict(zip(COLUMNS, values)) for values in result.fetchall()]
    for row in rows:
        row["payload"] = json.loads(row["payload"])
    return rows


def test_duckdb_queries_every_event_with_proper_column_types():
    path = setting("EXPORT_ALL_PARQUET")
    types = duckdb_types(path)
    assert types["event_id"] == "VARCHAR"
    assert types["sequence"] == "BIGINT"
    assert types["recorded_at"] == "TIMESTAMP WITH TIME ZONE"
    assert types["occurred_at"] == "TIMESTAMP WITH TIME ZONE"

    expected = expected_rows("EXPORT_ALL_EXPECTED")
    assert duckdb_rows(path) == [comparable(row) for row in expected]

    counts = dict(
        duckdb.connect()
        .execute(
            f"SELECT event_type, count(*) FROM read_parquet({quoted(path)}) GROUP BY event_type"
        )
        .fetchall()
    )
    expected_counts = {}
    for row in expected:
        expected_counts[row["event_type"]] = expected_counts.get(row["event_type"], 0) + 1
    assert counts == expected_counts


def test_duckdb_queries_the_typed_payload_columns():
    path = setting("EXPORT_TYPED_PARQUET")
    types = duckdb_types(path)
    assert types["payload_total_minor"] == "BIGINT"
    assert types["payload_rating_window_days"] == "INTEGER"
    assert types["payload_free_delivery"] == "BOOLEAN"
    assert types["payload_placed_at"] == "TIMESTAMP WITH TIME ZONE"

    expected = expected_rows("EXPORT_TYPED_EXPECTED")
    result = duckdb.connect().execute(
        "SELECT aggregate_id, payload_total_minor, payload_region, epoch_us(payload_placed_at) "
        f"FROM read_parquet({quoted(path)}) ORDER BY aggregate_id"
    )
    rows = result.fetchall()
    want = sorted(
        (
            row["aggregate_id"],
            row["payload"]["total"]["minor"],
            row["payload"]["region"],
            micros(row["payload"]["placed_at"]),
        )
        for row in expected
    )
    assert rows == want
    total = duckdb.connect().execute(
        f"SELECT sum(payload_total_minor) FROM read_parquet({quoted(path)})"
    ).fetchone()[0]
    assert total == sum(row["payload"]["total"]["minor"] for row in expected)
