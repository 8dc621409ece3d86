"""The lean served store: publishes in integers, read through views with raw ids.

The views must hold exactly the rows the one-table history held for the same lists. The
expected rows are built here the old way: the same batches through `to_arrow` +
`with_rating` (raw ids and predicted_rating per row, as the spool once held them), with
the run id and start time the old insert added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pytest
from conftest import Workspace, _by_user, _ids, assert_error_last, rows, tables

from mfbatch.config import load_config
from mfbatch.serving.lists import build_lists, to_arrow, with_rating
from mfbatch.serving.session import Scorer
from mfbatch.stages.score import _job
from mfbatch.stages.score_inputs import load_inputs

COLUMNS = "run_id, user_id, item_id, rank, score, predicted_rating, source, created_at"


def _old_way(db: Path, run_id: str, k: int) -> list[tuple[Any, ...]]:
    """(run_id, user_id, item_id, rank, score, predicted_rating, source) as the one-table
    history stored them for this run's lists, from the scorer's own batches."""
    config = load_config(db=db, overrides={"score": {"run_id": run_id, "top_k": k}})
    job, _ = _job(config, load_inputs(config))
    scorer = Scorer(job.model_path, provider="cpu", threads=1)
    lo, hi = job.rating_range
    out: list[tuple[Any, ...]] = []
    for batch in build_lists(scorer, job.plan, 64):
        table = with_rating(to_arrow(batch, job.user_ids, job.item_ids), job.objective, lo, hi)
        for r in table.to_pylist():
            out.append(
                (
                    run_id,
                    str(r["user_id"]),
                    str(r["item_id"]),
                    r["rank"],
                    r["score"],
                    r["predicted_rating"],
                    str(r["source"]),
                )
            )
    return sorted(out, key=lambda r: (r[1], r[3]))


def _served(db: Path, table: str = "recommendations") -> list[tuple[Any, ...]]:
    return rows(db, f"SELECT {COLUMNS} FROM {table} ORDER BY user_id, rank")


@pytest.mark.parametrize("which", ["validated", "refit"])
def test_the_views_hold_the_rows_the_one_table_history_held(ws: Workspace, which: str) -> None:
    run_id = ws.validated if which == "validated" else ws.refit  # both rating models
    result = ws.score("--top-k", "7", "--run-id", run_id)
    assert result.exit_code == 0, result.stderr
    served = _served(ws.db)
    expected = _old_way(ws.db, run_id, 7)
    assert [r[:7] for r in served] == expected  # row for row, scores and ratings exact
    ((created, published),) = rows(ws.db, "SELECT created_at, published_at FROM publishes")
    assert {r[7] for r in served} == {created}
    assert all(r[5] is not None for r in served if r[6] != "popularity")
    counts = rows(ws.db, "SELECT users, rows, popularity_users, fold_in_users FROM publishes")
    listed = {r[1] for r in served}
    from_popularity = {r[1] for r in served if r[6] == "popularity"}
    assert counts == [(len(listed), len(served), len(from_popularity), 0)]
    history = rows(
        ws.db,
        f"SELECT publish_id, published_at, {COLUMNS} FROM recommendation_history "
        "ORDER BY user_id, rank",
    )
    assert history == [(1, published, *r) for r in served]
    # Stored once, in integers: no raw id or run id on a list row.
    types = dict(
        rows(
            ws.db,
            "SELECT column_name, data_type FROM duckdb_columns() "
            "WHERE table_name = 'publish_lists'",
        )
    )
    assert types == {
        "publish_id": "INTEGER",
        "origin": "INTEGER",
        "user_idx": "INTEGER",
        "item_idx": "INTEGER",
        "rank": "INTEGER",
        "score": "FLOAT",
        "source": "TINYINT",
    }
    kinds = dict(rows(ws.db, "SELECT table_name, table_type FROM information_schema.tables"))
    assert kinds["recommendations"] == kinds["recommendation_history"] == "VIEW"


def _to_old_layout(db: Path) -> None:
    """Rewrite a database's served lists as the previous version stored them: one
    `recommendation_history` table with raw ids on every row, `recommendations` a view."""
    con = duckdb.connect(str(db))
    try:
        con.execute(
            "CREATE TABLE old AS SELECT publish_id, published_at, run_id, user_id, item_id, "
            "rank, score, predicted_rating, source, created_at FROM recommendation_history"
        )
        for statement in (
            "DROP VIEW recommendations",
            "DROP VIEW recommendation_history",
            "DROP TABLE publish_lists",
            "DROP TABLE publishes",
            "DROP TABLE list_users",
            "DROP TABLE list_items",
            "ALTER TABLE old RENAME TO recommendation_history",
            "CREATE VIEW recommendations AS SELECT run_id, user_id, item_id, rank, score, "
            "predicted_rating, source, created_at FROM recommendation_history WHERE "
            "publish_id = (SELECT max(publish_id) FROM recommendation_history)",
        ):
            con.execute(statement)
    finally:
        con.close()


def test_a_database_in_the_previous_layout_is_migrated_by_the_next_publish(
    ws: Workspace,
) -> None:
    # Three publishes: a rating model's, a --users update (carried-over rows keep their
    # run and time), a ranking model's; the previous layout stored them row by row.
    assert ws.score("--top-k", "5", "--run-id", ws.validated).exit_code == 0
    chosen = sorted(_ids(ws.db, "users").values())[:2]
    users = ws.write_ids("users.txt", chosen)
    assert ws.score("--top-k", "4", "--users", users).exit_code == 0
    history = _served(ws.db, "recommendation_history")
    full = rows(ws.db, f"SELECT publish_id, published_at, {COLUMNS} FROM recommendation_history")
    _to_old_layout(ws.db)
    assert _served(ws.db, "recommendation_history") == history
    # Readers read the previous layout as it is (they open it read-only).
    assert cli_ok_lines(ws.db, "diff")[-1].startswith("publish 1 -> 2: ")
    result = ws.score("--top-k", "3", "--keep-history", "3")
    assert result.exit_code == 0, result.stderr
    assert "publish 3" in result.stdout
    after = rows(
        ws.db,
        f"SELECT publish_id, published_at, {COLUMNS} FROM recommendation_history "
        "WHERE publish_id < 3",
    )
    assert sorted(after, key=str) == sorted(full, key=str)
    assert "recommendation_history" not in {
        t for (t,) in rows(ws.db, "SELECT table_name FROM duckdb_tables()")
    }
    assert {r[3] for r in _served(ws.db)} == {1, 2, 3}  # the new publish is served
    # The migrated publishes are ordinary ones from then on: pruned like any other.
    assert ws.score("--top-k", "2", "--keep-history", "1").exit_code == 0
    assert rows(ws.db, "SELECT DISTINCT publish_id FROM recommendation_history") == [(4,)]


def cli_ok_lines(db: Path, *args: str) -> list[str]:
    from conftest import cli_ok

    return cli_ok(*args, "--db", db).splitlines()


def test_a_pruned_origin_survives_the_migration(ws: Workspace) -> None:
    """A --users update whose carried-over rows came from a publish already pruned: the
    previous layout still named their run and time on every row; so does the view."""
    assert ws.score("--top-k", "5", "--run-id", ws.validated).exit_code == 0
    chosen = sorted(_ids(ws.db, "users").values())[:1]
    users = ws.write_ids("users.txt", chosen)
    assert ws.score("--top-k", "4", "--users", users, "--keep-history", "1").exit_code == 0
    kept = _served(ws.db, "recommendation_history")
    assert len({(r[0], r[7]) for r in kept}) == 2  # two runs/times in the one publish
    _to_old_layout(ws.db)
    assert ws.score("--top-k", "4", "--users", users, "--keep-history", "2").exit_code == 0
    migrated = rows(
        ws.db,
        f"SELECT {COLUMNS} FROM recommendation_history WHERE publish_id = 2 ORDER BY user_id, rank",
    )
    assert migrated == kept
    by_user = _by_user(_served(ws.db))
    for user, listed in _by_user(kept).items():
        if user not in chosen:
            assert by_user[user] == listed


def test_a_table_from_0_1_0_is_refused_with_the_fix(ws: Workspace) -> None:
    assert ws.score("--top-k", "5").exit_code == 0
    con = duckdb.connect(str(ws.db))
    con.execute(
        "CREATE TABLE old AS SELECT run_id, user_id, item_id, rank, score, predicted_rating, "
        "created_at FROM recommendations"
    )
    for statement in (
        "DROP VIEW recommendations",
        "DROP VIEW recommendation_history",
        "DROP TABLE publish_lists",
        "DROP TABLE publishes",
        "DROP TABLE list_users",
        "DROP TABLE list_items",
        "ALTER TABLE old RENAME TO recommendations",
    ):
        con.execute(statement)
    con.close()
    before = tables(ws.db)
    result = ws.score("--top-k", "3")
    assert_error_last(result, 4, "from mfbatch 0.1.0", "DROP TABLE recommendations")
    assert tables(ws.db) == before
    con = duckdb.connect(str(ws.db))
    con.execute("DROP TABLE recommendations")
    con.close()
    assert ws.score("--top-k", "3").exit_code == 0


def test_lists_keep_their_ids_when_the_database_is_preprocessed_again(ws: Workspace) -> None:
    """Indices name a dataset's id mapping; the history keeps the dictionaries its
    publishes need, so lists published before a new preprocess read as they were."""
    assert ws.score("--top-k", "5").exit_code == 0
    before = _served(ws.db)
    con = duckdb.connect(str(ws.db))
    con.execute("UPDATE users SET user_id = 'x' || user_id")  # other ids, same indices
    con.execute("UPDATE items SET item_id = 'y' || item_id")
    con.close()
    assert _served(ws.db) == before
    assert rows(ws.db, "SELECT count(DISTINCT mapping) FROM list_users") == [(1,)]
