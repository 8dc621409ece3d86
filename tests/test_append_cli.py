"""The daily cycle through the CLI on real DuckDB files: `preprocess --append`, then `score`
serving appended users and ratings by fold-in, without retraining.

One small synthetic dataset is preprocessed and trained (validated run + refit) once per
module; each test appends to its own copy.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pytest
from conftest import Run, Snapshot, cli, cli_ok
from conftest import rows as _rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mfbatch.store.db

SMALL = ["--embedding-dim", "8", "--batch-size", "256", "--negatives", "32", "--epochs", "3"]
HEADER = "user_id,item_id,rating,timestamp\n"


def _csv(path: Path, rows: list[tuple[Any, ...]]) -> Path:
    path.write_text(HEADER + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def _append(db: Path, source: Path) -> Run:
    return cli("preprocess", "--append", "--dataset", "csv", "--source", source, "--db", db)


def _preprocess(db: Path) -> None:
    cli_ok(
        "preprocess",
        "--dataset",
        "synthetic",
        "--users",
        "60",
        "--items",
        "40",
        "--ratings-per-user",
        "12",
        "--split",
        "user-time",
        "--val-fraction",
        "0.2",
        "--db",
        db,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("daily")
    db = root / "mf.duckdb"
    _preprocess(db)
    for extra in ([], ["--on", "all"]):
        cli_ok("train", "--db", db, "--export-dir", root / "export", *SMALL, "--seed", "1", *extra)
    return root


@pytest.fixture
def db(trained: Path, tmp_path: Path) -> Path:
    root = tmp_path / "w"
    shutil.copytree(trained, root)
    return root / "mf.duckdb"


def _mapping(db: Path, table: str) -> dict[str, int]:
    key = "user" if table == "users" else "item"
    return dict(_rows(db, f"SELECT {key}_id, {key}_idx FROM {table}"))


def _pairs(db: Path) -> list[tuple[tuple[str, str], float]]:
    rows = _rows(
        db,
        "SELECT u.user_id, i.item_id, r.rating FROM ratings r JOIN users u USING (user_idx) "
        "JOIN items i USING (item_idx)",
    )
    return [((u, i), r) for u, i, r in rows]


def _score(db: Path, *args: str) -> str:
    return cli_ok("score", "--db", db, "--provider", "cpu", "--threads", "1", *args)


def test_append_counts_and_keeps_the_split(db: Path, tmp_path: Path) -> None:
    before = dict(_rows(db, "SELECT split, count(*) FROM ratings GROUP BY split"))
    (user, item, stored), (old_user, old_item, old_rating) = _rows(
        db,
        "SELECT u.user_id, i.item_id, r.rating FROM ratings r JOIN users u USING (user_idx) "
        "JOIN items i USING (item_idx) WHERE split = 'val' ORDER BY 1, 2 LIMIT 2",
    )
    new_rating = 1 if stored != 1 else 5
    source = _csv(
        tmp_path / "day1.csv",
        [
            (user, item, new_rating, 2_000_000_000),  # replaces a val rating, stays 'val'
            (old_user, old_item, 1 if old_rating != 1 else 5, 0),  # older than stored: ignored
            ("new-a", item, 4, 2_000_000_001),
            ("new-a", "new-item", 5, 2_000_000_002),
            ("new-b", item, 3, 2_000_000_003),
            ("new-b", item, 2, 2_000_000_004),  # duplicate in the file: the later one wins
        ],
    )
    result = _append(db, source)
    assert result.exit_code == 0, result.stderr
    line = result.stdout.strip()
    assert "as version 1 (1 duplicate (user, item) dropped)" in line, line
    counted = "3 new ratings, 1 replaced, 1 older than the stored rating ignored, 2 new users"
    assert counted + ", 1 new items" in line, line
    after = dict(_rows(db, "SELECT split, count(*) FROM ratings GROUP BY split"))
    assert after == {**before, "append": 3}
    assert _rows(
        db,
        "SELECT rating, split, version FROM ratings r JOIN users u USING (user_idx) "
        "JOIN items i USING (item_idx) WHERE u.user_id = $u AND i.item_id = $i",
        u=user,
        i=item,
    ) == [(float(new_rating), "val", 1)]
    assert _rows(
        db,
        "SELECT r.rating FROM ratings r JOIN users u USING (user_idx) "
        "JOIN items i USING (item_idx) WHERE u.user_id = 'new-b'",
    ) == [(2.0,)]
    assert _rows(
        db,
        "SELECT rating, version FROM ratings r JOIN users u USING (user_idx) "
        "JOIN items i USING (item_idx) WHERE u.user_id = $u AND i.item_id = $i",
        u=old_user,
        i=old_item,
    ) == [(old_rating, 0)]
    ((n_users, n_items, n_train, n_val),) = _rows(
        db, "SELECT n_users, n_items, n_train, n_val FROM dataset_meta"
    )
    assert (n_users, n_items) == (62, 41)
    assert (n_train, n_val) == (before["train"], before["val"])
    versions = _rows(
        db,
        "SELECT version, parent, rows_added, new_users, new_items, replaced "
        "FROM dataset_versions ORDER BY version",
    )
    assert versions[1] == (1, 0, 3, 2, 1, 1)


_ids = st.sampled_from([*(str(i) for i in range(1, 8)), "x", "y", "zz"])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    appends=st.lists(
        st.lists(st.tuples(_ids, _ids, st.integers(1, 5)), min_size=1, max_size=6),
        min_size=1,
        max_size=3,
    )
)
def test_any_sequence_of_appends_keeps_every_mapping(
    appends: list[list[tuple[str, str, int]]],
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        db = Path(folder) / "ids.duckdb"
        base = _csv(
            Path(folder) / "base.csv", [(1, 1, 3, 1_000), (2, 2, 4, 1_001), (3, 1, 5, 1_002)]
        )
        cli_ok(
            "preprocess",
            "--dataset",
            "csv",
            "--source",
            base,
            "--db",
            db,
            "--rating-min",
            "1",
            "--rating-max",
            "5",
            "--split",
            "random",
        )
        sha = _rows(db, "SELECT dataset_sha256 FROM dataset_meta")
        for day, rows in enumerate(appends):
            users, items = _mapping(db, "users"), _mapping(db, "items")
            old_pairs = dict(_pairs(db))
            source = _csv(
                Path(folder) / f"day{day}.csv",
                [(*r, 2_000 + 100 * day + i) for i, r in enumerate(rows)],
            )
            result = _append(db, source)
            assert result.exit_code == 0, result.stderr
            after_users, after_items = _mapping(db, "users"), _mapping(db, "items")
            for before, after, key in ((users, after_users, 0), (items, after_items, 1)):
                assert {k: after[k] for k in before} == before  # every mapping kept
                fresh = sorted({str(r[key]) for r in rows} - set(before))
                # New ids take the next free indices, in sorted raw-id order.
                assert sorted(after.values()) == list(range(len(after)))
                assert [k for k, _ in sorted(after.items(), key=lambda kv: kv[1])][
                    len(before) :
                ] == (
                    sorted(fresh, key=lambda v: (not v.isdigit(), v))
                    if all(f.isdigit() for f in fresh)
                    else sorted(fresh)
                )
            latest = {(u, i): float(r) for u, i, r in rows}  # timestamps rise: last wins
            stored = dict(_pairs(db))
            assert set(stored) == set(old_pairs) | set(latest)
            assert {p: stored[p] for p in latest} == latest
            assert _rows(db, "SELECT dataset_sha256 FROM dataset_meta") == sha


def test_score_folds_in_appended_users_and_never_lists_a_rated_item(
    db: Path, tmp_path: Path
) -> None:
    items = sorted(_mapping(db, "items"))
    known_user = sorted(_mapping(db, "users"))[0]
    rows = [("newcomer", item, 5, 2_000_000_000 + n) for n, item in enumerate(items[:6])]
    rows += [(known_user, item, 4, 2_000_000_100 + n) for n, item in enumerate(items[-3:])]
    rows += [("newcomer", "brand-new-item", 5, 2_000_000_200)]
    assert _append(db, _csv(tmp_path / "day1.csv", rows)).exit_code == 0
    line = _score(db).strip().splitlines()[-1]
    assert "2 folded in" in line, line
    sources = dict(
        _rows(db, "SELECT user_id, any_value(source) FROM recommendations GROUP BY user_id")
    )
    assert sources["newcomer"] == "fold-in"
    assert sources[known_user] == "fold-in"
    assert "popularity" not in {s for u, s in sources.items() if u not in ("newcomer", known_user)}
    # No list holds an item its user rated, in any split, appended ones included; no item
    # the model has never seen is offered.
    assert _rows(
        db,
        "SELECT count(*) FROM recommendations r JOIN users u USING (user_id) "
        "JOIN items i USING (item_id) JOIN ratings x "
        "ON x.user_idx = u.user_idx AND x.item_idx = i.item_idx",
    ) == [(0,)]
    assert _rows(db, "SELECT count(*) FROM recommendations WHERE item_id = 'brand-new-item'") == [
        (0,)
    ]
    assert _rows(db, "SELECT count(*) FROM recommendations WHERE user_id = 'newcomer'") == [(20,)]
    # recommend --user works for the appended user, without retraining.
    shown = cli_ok("recommend", "--db", db, "--user", "newcomer")
    assert "fold-in" in shown and "recommended for user newcomer" in shown


def test_a_refit_after_the_append_serves_appended_users_from_its_own_vectors(
    db: Path, tmp_path: Path
) -> None:
    items = sorted(_mapping(db, "items"))
    rows = [("newcomer", item, 5, 2_000_000_000 + n) for n, item in enumerate(items[:6])]
    assert _append(db, _csv(tmp_path / "day1.csv", rows)).exit_code == 0
    n_train = _rows(db, "SELECT count(*) FROM ratings WHERE split = 'train'")[0][0]
    cli_ok("train", "--db", db, "--export-dir", db.parent / "export", *SMALL)
    # A validated run fits the train split only: appended rows are not in it.
    assert _rows(db, "SELECT n_train FROM training_runs ORDER BY finished_at DESC LIMIT 1") == [
        (n_train,)
    ]
    cli_ok("train", "--db", db, "--export-dir", db.parent / "export", *SMALL, "--on", "all")
    line = _score(db).strip().splitlines()[-1]
    assert "folded in" not in line, line
    assert _rows(db, "SELECT DISTINCT source FROM recommendations WHERE user_id = 'newcomer'") == [
        ("model",)
    ]


def test_a_re_preprocess_that_remaps_ids_is_still_refused(
    db: Path, tmp_path: Path, user_error: Callable[..., str]
) -> None:
    items = sorted(_mapping(db, "items"))
    assert (
        _append(db, _csv(tmp_path / "a.csv", [("newcomer", items[0], 5, 2_000_000_000)])).exit_code
        == 0
    )
    rows = _rows(db, "SELECT user_idx, item_idx, rating, epoch(ts)::BIGINT FROM ratings")
    source = _csv(tmp_path / "all.csv", rows)
    # Same ratings, user and item columns swapped: every id means something else now.
    cli_ok(
        "preprocess",
        "--dataset",
        "csv",
        "--source",
        source,
        "--db",
        db,
        "--user-col",
        "item_id",
        "--item-col",
        "user_id",
        "--split",
        "user-time",
    )
    result = cli("score", "--db", db, "--provider", "cpu")
    user_error(result, 5, "re-preprocessed since")


WRITES = (
    "append_insert_users",
    "append_insert_items",
    "append_replace_ratings",
    "append_insert_ratings",
    "append_recount_users",
    "append_recount_items",
    "append_update_meta",
    "append_insert_version",
)


def _day(db: Path, tmp_path: Path) -> Path:
    items = sorted(_mapping(db, "items"))
    known = sorted(_mapping(db, "users"))[0]
    return _csv(
        tmp_path / "day1.csv",
        [
            ("newcomer", items[0], 5, 2_000_000_000),
            (known, items[1], 1, 2_000_000_001),
            (known, "new-item", 3, 2_000_000_002),
        ],
    )


def _state(db: Path, snapshot: Snapshot) -> tuple[Any, ...]:
    return (snapshot(db), _rows(db, "SELECT * FROM dataset_versions ORDER BY version"))


def test_every_write_step_is_covered(
    db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fault test below fails each of WRITES: they must be all the append writes."""
    real, calls = mfbatch.store.db.run, []

    def counting(con: duckdb.DuckDBPyConnection, name: str, **params: Any) -> Any:
        calls.append(name)
        return real(con, name, **params)

    monkeypatch.setattr(mfbatch.store.db, "run", counting)
    assert _append(db, _day(db, tmp_path)).exit_code == 0
    reads = (
        "dataset_identity",
        "dataset_feedback",
        "dataset_feedback_value",
        "table_exists",
        "append_stored_config",
        "append_lineage",
        "append_counts",
    )
    assert [c for c in calls if c not in reads] == list(WRITES)


@pytest.mark.parametrize("step", WRITES)
@pytest.mark.parametrize(
    ("error", "code"), [(duckdb.IOException("disk full (injected)"), 4), (KeyboardInterrupt(), 130)]
)
def test_the_append_is_atomic_under_injected_faults(
    db: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    db_snapshot: Snapshot,
    step: str,
    error: BaseException,
    code: int,
) -> None:
    source = _day(db, tmp_path)
    before = _state(db, db_snapshot)
    real = mfbatch.store.db.run

    def failing(con: duckdb.DuckDBPyConnection, name: str, **params: Any) -> Any:
        if name == step:
            raise error
        return real(con, name, **params)

    monkeypatch.setattr(mfbatch.store.db, "run", failing)
    result = _append(db, source)
    monkeypatch.undo()
    assert result.exit_code == code, (result.stderr, result.exception)
    assert "Traceback" not in result.stderr
    assert _state(db, db_snapshot) == before
    # And the same append, unhindered, then goes through.
    assert _append(db, source).exit_code == 0
    assert _rows(db, "SELECT max(version) FROM dataset_versions") == [(1,)]


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("missing-column.csv", "user_id,rating,timestamp\n1,4,5\n", "no column 'item_id'"),
        ("words.csv", HEADER + "1,1,five,1000\n", "five"),
        ("off-scale.csv", HEADER + "1,1,9,1000\n", "outside the scale"),
        ("empty.csv", HEADER, ""),
    ],
)
def test_bad_appended_files_get_preprocess_errors_and_change_nothing(
    db: Path,
    tmp_path: Path,
    db_snapshot: Snapshot,
    user_error: Callable[..., str],
    name: str,
    content: str,
    fragment: str,
) -> None:
    source = tmp_path / name
    source.write_text(content)
    before = _state(db, db_snapshot)
    appended = _append(db, source)
    message = user_error(appended, 3, fragment)
    assert _state(db, db_snapshot) == before
    # The same file through a plain preprocess (same loaders) says the same thing.
    fresh = cli(
        "preprocess",
        "--dataset",
        "csv",
        "--source",
        source,
        "--db",
        tmp_path / "fresh.duckdb",
        "--rating-min",
        "1",
        "--rating-max",
        "5",
    )
    if name == "off-scale.csv":
        # Append keeps the stored scale, so it can't advise the flags preprocess does.
        assert "which an append keeps" in message
        assert "pass --rating-min/--rating-max that cover them" in user_error(fresh, 3)
    else:
        assert user_error(fresh, 3) == message


def test_append_flags_are_checked(db: Path, tmp_path: Path, user_error: Callable[..., str]) -> None:
    result = cli("preprocess", "--append", "--db", db)
    user_error(result, 2, "--append", "--source")
    source = _day(db, tmp_path)
    result = cli(
        "preprocess",
        "--append",
        "--dataset",
        "csv",
        "--source",
        source,
        "--db",
        db,
        "--split",
        "random",
    )
    user_error(result, 2, "--append", "--split")
    result = cli(
        "preprocess",
        "--append",
        "--dataset",
        "csv",
        "--source",
        source,
        "--db",
        tmp_path / "none.duckdb",
    )
    user_error(result, 4, "does not exist")
    assert not (tmp_path / "none.duckdb").exists()


def test_a_database_from_before_lineage_is_refused_with_the_fix(
    db: Path, tmp_path: Path, user_error: Callable[..., str]
) -> None:
    con = duckdb.connect(str(db))
    con.execute("DROP TABLE dataset_versions")
    con.execute("ALTER TABLE ratings DROP COLUMN version")
    con.close()
    before = _rows(db, "SELECT count(*) FROM ratings")
    args = ("--db", db, "--provider", "cpu", "--threads", "1")
    user_error(cli("score", *args), 4, "older mfbatch", "preprocess` again")
    user_error(_append(db, _day(db, tmp_path)), 4, "older mfbatch", "preprocess` again")
    assert _rows(db, "SELECT count(*) FROM ratings") == before


def test_score_users_and_a_validated_run_fold_in_appended_users_too(
    db: Path, tmp_path: Path
) -> None:
    items = sorted(_mapping(db, "items"))
    rows = [("newcomer", item, 5, 2_000_000_000 + n) for n, item in enumerate(items[:6])]
    assert _append(db, _csv(tmp_path / "day1.csv", rows)).exit_code == 0
    _score(db)
    everyone = _rows(db, "SELECT user_id, item_id, rank FROM recommendations ORDER BY ALL")
    # --users: only the newcomer's rows are replaced, through the same fold-in.
    (tmp_path / "users.txt").write_text("newcomer\n")
    line = _score(db, "--users", str(tmp_path / "users.txt")).strip().splitlines()[-1]
    assert "scored 1 users" in line and "1 folded in" in line, line
    assert _rows(db, "SELECT user_id, item_id, rank FROM recommendations ORDER BY ALL") == everyone
    # A validated run never fitted appended rows: it folds the newcomer in as well.
    ((validated,),) = _rows(db, "SELECT run_id FROM training_runs WHERE data_seen = 'train'")
    line = _score(db, "--run-id", validated).strip().splitlines()[-1]
    assert "1 folded in" in line, line
    assert _rows(
        db, "SELECT DISTINCT source, run_id FROM recommendations WHERE user_id = 'newcomer'"
    ) == [("fold-in", validated)]


# What `score` counted as each run's fitted ratings before it read them as every rating
# less the untrained rows: the GROUP BY it ran until then, kept here as the reference.
_GROUPED = """
SELECT 'user' AS kind, user_idx AS idx, count(*) AS n FROM ratings
WHERE split = 'train' OR ($all_splits AND (split = 'val' OR version <= $version))
GROUP BY user_idx
UNION ALL
SELECT 'item' AS kind, item_idx AS idx, count(*) AS n FROM ratings
WHERE split = 'train' OR ($all_splits AND (split = 'val' OR version <= $version))
GROUP BY item_idx
"""


def test_fitted_counts_equal_the_group_by_for_every_run_after_an_append(
    db: Path, tmp_path: Path
) -> None:
    import numpy as np

    from mfbatch.serving.csr import SeenItems
    from mfbatch.serving.lists import fitted_counts, fitted_counts_less

    items = sorted(_mapping(db, "items"))
    known_user = sorted(_mapping(db, "users"))[0]
    rows = [("newcomer", item, 5, 2_000_000_000 + n) for n, item in enumerate(items[:6])]
    rows += [(known_user, item, 4, 2_000_000_100 + n) for n, item in enumerate(items[-3:])]
    assert _append(db, _csv(tmp_path / "day1.csv", rows)).exit_code == 0
    con = duckdb.connect(str(db), read_only=True)
    try:
        ((n_users, n_items),) = con.execute(
            "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM items)"
        ).fetchall()
        pairs = mfbatch.store.db.arrays(con, "seen_all")
        seen = SeenItems.from_pairs(pairs["user_idx"], pairs["item_idx"], n_users)
        popularity = np.bincount(pairs["item_idx"], minlength=n_items)
        untrained_rows = 0
        for run_id, data_seen in con.execute(
            "SELECT run_id, data_seen FROM training_runs"
        ).fetchall():
            all_splits = data_seen == "train+val"
            version = mfbatch.store.db.record(con, "run_data_version", run_id=run_id)
            params = {"all_splits": all_splits, "version": version["version"]}  # type: ignore[index]
            untrained = mfbatch.store.db.arrays(con, "untrained_versioned", **params)
            untrained_rows += len(untrained["user_idx"])
            got = fitted_counts_less(seen, popularity, untrained, n_users, n_items)
            grouped = con.sql(_GROUPED, params=params).fetchnumpy()
            expected = fitted_counts(grouped, n_users, n_items)
            for mine, theirs in zip(got, expected, strict=True):
                assert np.array_equal(mine, theirs), run_id
    finally:
        con.close()
    # Both kinds of untrained rows occur (val under the validated run, the append under
    # both), so the subtraction is really exercised.
    assert untrained_rows > len(rows)
