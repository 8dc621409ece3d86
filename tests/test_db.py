"""mfbatch.store.db: the named-query loader, connections and the all-or-nothing transaction."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from mfbatch.errors import DatabaseError
from mfbatch.store import db

GOOD = """
-- A comment before the first block is ignored.

-- name: count_users
-- How many users; a comment inside a block is dropped.
SELECT count(*) FROM users WHERE n_ratings >= $min_ratings;

-- name: user_by_id
SELECT user_idx
FROM users
WHERE user_id = $user_id AND n_train > $n_train;
"""


def test_parse_queries_names_sql_and_params() -> None:
    found = db.parse_queries(GOOD, "good.sql")
    assert list(found) == ["count_users", "user_by_id"]
    count = found["count_users"]
    assert count.sql == "SELECT count(*) FROM users WHERE n_ratings >= $min_ratings;"
    assert count.params == frozenset({"min_ratings"})
    assert count.origin == "good.sql"
    assert found["user_by_id"].params == frozenset({"user_id", "n_train"})
    assert found["user_by_id"].sql.startswith("SELECT user_idx\nFROM users")


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        (
            "-- name: a\nSELECT 1;\n-- name: a\nSELECT 2;\n",
            "bad.sql: query 'a' is defined twice",
        ),
        ("-- name: a\nSELECT 1;\n-- name: empty\n\n-- only a comment\n", "query 'empty' is empty"),
        ("-- name: a\n", "query 'a' is empty"),
        ("-- name: broken\nSELEC 1 FROM;\n", "query 'broken' does not parse"),
        ("-- name: two\nSELECT 1; SELECT 2;\n", "query 'two' holds 2 statements; one per name"),
        ("SELECT 1;\n", "bad.sql: no '-- name: ...' blocks found"),
        (
            "-- name: a\nSELECT 1;\n-- name: TopK\nSELECT 2;\n",
            "bad.sql line 3: '-- name: TopK' is not a valid query name",
        ),
        ("-- header\nSELECT 0;\n-- name: a\nSELECT 1;\n", "bad.sql line 2: SQL before the first"),
    ],
    ids=[
        "duplicate",
        "empty-block",
        "empty-last",
        "syntax",
        "two-statements",
        "no-names",
        "bad-name",
        "sql-before-names",
    ],
)
def test_parse_queries_rejects(text: str, expect: str) -> None:
    with pytest.raises(DatabaseError) as caught:
        db.parse_queries(text, "bad.sql")
    assert expect in str(caught.value)
    assert "\n" not in str(caught.value).strip()


def test_every_sql_file_loads() -> None:
    sql_dir = Path(__file__).resolve().parent.parent / "sql"
    files = sorted(sql_dir.glob("*.sql"))
    assert {"catalog.sql", "preprocess.sql"} <= {f.name for f in files}
    total = 0
    for path in files:
        parsed = db.parse_queries(path.read_text(encoding="utf-8"), path.name)
        assert parsed, path.name
        total += len(parsed)
    everything = db.queries()
    assert len(everything) == total  # no name defined in two files
    for table in ("users", "items", "ratings", "dataset_meta"):
        for verb in ("drop", "create", "insert"):
            assert f"{verb}_{table}" in everything
    assert everything["table_exists"].params == frozenset({"table"})
    assert everything["insert_dataset_meta"].origin == "preprocess.sql"


def test_the_preprocess_queries_build_the_contract_tables() -> None:
    con = duckdb.connect()
    try:
        for table in ("users", "items", "ratings", "dataset_meta"):
            db.run(con, f"create_{table}")
            assert db.table_exists(con, table)
        columns = {
            table: [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]
            for table in ("users", "items", "ratings")
        }
        assert columns == {
            "users": ["user_idx", "user_id", "n_ratings", "n_train"],
            "items": ["item_idx", "item_id", "title", "genres", "n_ratings", "n_train"],
            "ratings": [
                "user_idx",
                "item_idx",
                "rating",
                "rating_norm",
                "ts",
                "split",
                "cold_user",
                "cold_item",
                "version",  # the dataset_versions row that last wrote it
                "weight",  # the interaction's weight in the softmax losses
            ],
        }
        with pytest.raises(duckdb.ConstraintException):
            con.execute("INSERT INTO ratings VALUES (0, 0, 1, 0, NULL, 'test', false, false, 0, 1)")
        db.run(con, "drop_ratings")
        assert not db.table_exists(con, "ratings")
    finally:
        con.close()


def test_run_checks_the_parameters() -> None:
    con = duckdb.connect()
    try:
        with pytest.raises(TypeError, match=r"takes parameters \['table'\], got \[\]"):
            db.run(con, "table_exists")
        with pytest.raises(TypeError, match="got \\['table', 'tables'\\]"):
            db.run(con, "table_exists", table="x", tables="y")
        assert db.run(con, "table_exists", table="nope").fetchone() == (False,)
    finally:
        con.close()


def test_connect_read_only_to_a_missing_database(tmp_path: Path) -> None:
    missing = tmp_path / "none.duckdb"
    with pytest.raises(DatabaseError, match=r"does not exist; run `mfbatch preprocess --db"):
        db.connect(missing, read_only=True)
    assert not missing.exists()


def test_require_tables_names_what_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "x.duckdb"
    con = db.connect(path)
    try:
        db.run(con, "create_users")
        db.require_tables(con, path, "users")
        with pytest.raises(DatabaseError) as caught:
            db.require_tables(con, path, "users", "items", "ratings")
        assert f"database {path} has no items, ratings table" in str(caught.value)
        assert "mfbatch preprocess" in str(caught.value)
    finally:
        con.close()


def test_transaction_rolls_back_everything_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "x.duckdb"
    con = db.connect(path)
    try:
        con.execute("CREATE TABLE kept AS SELECT 1 AS v")
        with pytest.raises(DatabaseError) as caught, db.transaction(con, "the test tables"):
            con.execute("DROP TABLE kept")
            con.execute("CREATE TABLE half AS SELECT 2 AS v")
            con.execute("SELECT * FROM no_such_table")
        assert "writing the test tables failed and was rolled back, nothing changed" in str(
            caught.value
        )
        assert con.execute("SELECT * FROM kept").fetchall() == [(1,)]
        assert not db.table_exists(con, "half")

        with pytest.raises(KeyError), db.transaction(con, "the test tables"):
            con.execute("DROP TABLE kept")
            raise KeyError("not a database error: passes through, still rolled back")
        assert con.execute("SELECT * FROM kept").fetchall() == [(1,)]

        with db.transaction(con, "the test tables"):
            con.execute("CREATE TABLE committed AS SELECT 3 AS v")
    finally:
        con.close()
    again = db.connect(path, read_only=True)
    try:
        assert again.execute("SELECT * FROM committed").fetchall() == [(3,)]
    finally:
        again.close()
