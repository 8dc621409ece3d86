"""The rest of issue 20's red-team list: one line each, non-zero exit where refused,
nothing changed; and what is served instead where refusing everyone was wrong."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    Workspace,
    assert_error_last,
    assert_user_error,
    cli,
    ok,
    rows,
    snapshot,
)

import mfbatch
from mfbatch.errors import ConfigError


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _append(ws: Workspace, name: str, lines: list[str]) -> None:
    source = ws.root / name
    source.write_text("user_id,item_id,rating,timestamp\n" + "\n".join(lines) + "\n")
    ok(cli("preprocess", "--append", "--dataset", "csv", "--source", source, "--db", ws.db))


def test_a_user_who_rated_the_whole_catalogue_does_not_block_the_publish(
    ws: Workspace,
) -> None:
    items = [i for (i,) in rows(ws.db, "SELECT item_id FROM items ORDER BY item_id")]
    _append(ws, "all.csv", [f"glutton,{item},4,2000000000" for item in items])
    result = ok(ws.score())
    assert "1 user(s) rated every item and have an empty list (e.g. user 'glutton')" in (
        result.stdout
    )
    served = {u for (u,) in rows(ws.db, "SELECT DISTINCT user_id FROM recommendations")}
    assert "glutton" not in served
    everyone = {u for (u,) in rows(ws.db, "SELECT user_id FROM users")}
    assert served == everyone - {"glutton"}


# --- the Python API: wrong argument types are one ConfigError naming the keyword -----------


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda db: mfbatch.score(db=5), "db=: expected a path"),
        (lambda db: mfbatch.score(db=b"x.duckdb"), "db=: expected a path"),
        (lambda db: mfbatch.score(db=db, config={"score": {}}), "config=: a Config or"),
        (lambda db: mfbatch.report(db=db, out=None), "out=: expected a path"),
        (lambda db: mfbatch.report(db=db, out=""), "out=: an empty path"),
        (lambda db: mfbatch.read_lists(db=db, publish="1"), "publish=: expected a whole"),
        (lambda db: mfbatch.diff(db=db, before=True), "before=: expected a whole"),
        (lambda db: mfbatch.recommend(db=db, user_id=7), "user_id=: a raw user id"),
        (lambda db: mfbatch.preprocess(db=db, split=3), "split=: a kind"),
        (lambda db: mfbatch.score(db=db, config="/dev/zero"), "is not a regular file"),
        (lambda db: mfbatch.score(db=db, config=db.parent), "is a folder"),
    ],
)
def test_api_argument_types_are_one_config_error(
    good_db: Path, call: Callable[[Path], object], fragment: str
) -> None:
    before = _hashes(good_db.parent)
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        call(good_db)
    assert _hashes(good_db.parent) == before


def test_api_split_may_name_the_kind(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    synthetic = {"dataset": "synthetic", "users": 20, "items": 10, "ratings_per_user": 5}
    mfbatch.preprocess(db=path, split="random", **synthetic)
    assert rows(path, "SELECT count(*) FROM ratings WHERE split = 'val'")[0][0] > 0


def test_config_naming_dev_zero_or_a_folder_is_one_line(good_db: Path) -> None:
    for path, what in (("/dev/zero", "is not a regular file"), (good_db.parent, "is a folder")):
        run = cli("score", "--db", good_db, "--config", path)
        assert_user_error(run, 2, "--config", what)


def test_a_scratch_named_folder_without_an_owner_is_never_deleted(ws: Workspace) -> None:
    """Only folders the tool made may go: a user's `.mfbatch-score-*` folder holding files
    stays, however old; an empty unowned one (a run killed before writing its owner) goes."""
    from mfbatch.serving.spool import SPOOL_PREFIX

    mine = ws.root / f"{SPOOL_PREFIX}notes"
    mine.mkdir()
    (mine / "keep.txt").write_text("a user's file\n")
    os.utime(mine, (1_000_000_000, 1_000_000_000))
    empty = ws.root / f"{SPOOL_PREFIX}killed"
    empty.mkdir()
    os.utime(empty, (1_000_000_000, 1_000_000_000))
    ok(ws.score())
    assert (mine / "keep.txt").read_text() == "a user's file\n"
    assert not empty.exists()


def test_recommend_for_a_user_added_since_the_last_score_says_so(ws: Workspace) -> None:
    ok(ws.score())
    item = rows(ws.db, "SELECT item_id FROM items LIMIT 1")[0][0]
    _append(ws, "new.csv", [f"newcomer,{item},4,2000000000"])
    before = _hashes(ws.root)
    run = cli("recommend", "--db", ws.db, "--user", "newcomer")
    assert_user_error(run, 4, "'newcomer' has no served list", "mfbatch score")
    assert _hashes(ws.root) == before


def test_a_promoted_run_of_old_data_advises_serve_clear(ws: Workspace) -> None:
    ok(cli("serve", "--db", ws.db, "--run-id", ws.validated))
    synthetic = ["--users", "30", "--items", "20", "--ratings-per-user", "6", "--seed", "9"]
    ok(cli("preprocess", "--dataset", "synthetic", *synthetic, "--db", ws.db))
    before = _hashes(ws.root)
    message = assert_error_last(ws.score(), 5, ws.validated, "serve --clear")
    assert "train again" not in message
    assert _hashes(ws.root) == before


def test_export_lists_refuses_lists_of_re_preprocessed_data(ws: Workspace) -> None:
    ok(ws.score())
    synthetic = ["--users", "30", "--items", "20", "--ratings-per-user", "6", "--seed", "9"]
    ok(cli("preprocess", "--dataset", "synthetic", *synthetic, "--db", ws.db))
    before = _hashes(ws.root)
    out = ws.root / "lists.csv"
    run = cli("export-lists", "--db", ws.db, "--output", out)
    assert_user_error(run, 5, "trained on other data", "mfbatch score")
    assert _hashes(ws.root) == before and not out.exists()
    ok(cli("export-lists", "--db", ws.db, "--output", out, "--publish", "1"))  # history as was


def test_appending_the_same_file_twice_changes_nothing(ws: Workspace) -> None:
    item = rows(ws.db, "SELECT item_id FROM items LIMIT 1")[0][0]
    user = rows(ws.db, "SELECT user_id FROM users LIMIT 1")[0][0]
    lines = [f"{user},{item},5,2000000000", f"newcomer,{item},3,2000000001"]
    _append(ws, "day.csv", lines)
    versions = rows(ws.db, "SELECT count(*) FROM dataset_versions")
    before = snapshot(ws.db)
    source = ws.root / "day.csv"
    run = cli("preprocess", "--append", "--dataset", "csv", "--source", source, "--db", ws.db)
    assert_error_last(run, 3, "already in", "nothing was changed")
    assert snapshot(ws.db) == before
    assert rows(ws.db, "SELECT count(*) FROM dataset_versions") == versions


def test_append_without_times_into_a_time_split_database_is_refused(ws: Workspace) -> None:
    ((kind,),) = rows(ws.db, "SELECT split_kind FROM dataset_meta")
    assert kind != "random"
    source = ws.root / "untimed.csv"
    source.write_text("user_id,item_id,rating\nnewcomer,1,4\n")
    before = _hashes(ws.root)
    args = ["--dataset", "csv", "--source", source, "--time-col", "", "--db", ws.db]
    run = cli("preprocess", "--append", *args)
    assert_user_error(run, 2, "--time-col ''", "split by time")
    assert _hashes(ws.root) == before


def test_append_out_of_scale_advises_what_append_accepts(ws: Workspace) -> None:
    ((hi,),) = rows(ws.db, "SELECT rating_max FROM dataset_meta")
    source = ws.root / "loud.csv"
    source.write_text(f"user_id,item_id,rating,timestamp\nnewcomer,1,{hi * 10},2000000000\n")
    before = snapshot(ws.db)
    run = cli("preprocess", "--append", "--dataset", "csv", "--source", source, "--db", ws.db)
    message = assert_error_last(run, 3, "outside", "which an append keeps", "re-preprocess")
    assert "pass --rating-min/--rating-max that cover them" not in message
    assert snapshot(ws.db) == before
