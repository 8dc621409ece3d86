"""Bring-your-own data: implicit feedback, given splits, weights as stored, hive ids as
text, and appends that reuse the preprocess's column mapping.

Every expectation is checked against the source rows the test wrote, through the real CLI
into a real DuckDB file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import assert_user_error, cli, ok, rows, snapshot

IMPLICIT_CSV = (
    "who,what,when\n"
    "u01,song-b,1700000000\n"
    "u01,song-a,1700000100\n"
    "u02,song-a,1700000200\n"
    "u02,song-a,1700000300\n"  # the same pair again: counts add up
    "u02,song-a,1700000250\n"
    "u03,song-c,1700000400\n"
    "u03,song-a,1700000500\n"
    "u01,song-c,1700000600\n"
)
NAMES = ["--user-col", "who", "--item-col", "what"]


def _preprocess(*args: str | Path) -> str:
    return ok(cli("preprocess", *[str(a) for a in args])).stdout


def _stored(db: Path) -> dict[tuple[str, str], tuple[float, float, str]]:
    """(user id, item id) -> (rating, weight, split) as the database holds it."""
    found = rows(
        db,
        "SELECT u.user_id, i.item_id, r.rating, r.weight, r.split FROM ratings r "
        "JOIN users u USING (user_idx) JOIN items i USING (item_idx)",
    )
    return {(u, i): (rating, weight, split) for u, i, rating, weight, split in found}


def test_implicit_csv_with_time_string_ids(tmp_path: Path) -> None:
    source = tmp_path / "plays.csv"
    source.write_text(IMPLICIT_CSV)
    db = tmp_path / "db.duckdb"
    out = _preprocess(
        "--dataset", "csv", "--source", source, *NAMES, "--time-col", "when",
        "--split", "user-time", "--weight-transform", "none", "--db", db,
    )  # fmt: skip
    assert "implicit feedback, 2 duplicate (user, item) merged" in out
    assert rows(db, "SELECT feedback, rating_min, rating_max FROM dataset_meta") == [
        ("implicit", 0.0, 1.0)
    ]
    stored = _stored(db)
    assert len(stored) == 6
    assert {r for r, _, _ in stored.values()} == {1.0}
    assert stored[("u02", "song-a")][1] == 3.0  # three rows of one pair: weight 3
    assert all(w == 1.0 for k, (_, w, _) in stored.items() if k != ("u02", "song-a"))
    # The merged pair keeps its latest time.
    assert rows(
        db,
        "SELECT epoch(ts) FROM ratings JOIN users USING (user_idx) WHERE user_id = 'u02'",
    ) == [(1700000300,)]


def test_implicit_default_transform_is_log2_one_plus(tmp_path: Path) -> None:
    source = tmp_path / "plays.csv"
    source.write_text(IMPLICIT_CSV)
    db = tmp_path / "db.duckdb"
    _preprocess(
        "--dataset", "csv", "--source", source, *NAMES, "--time-col", "", "--split",
        "random", "--db", db,
    )  # fmt: skip
    stored = _stored(db)
    assert stored[("u02", "song-a")][1] == pytest.approx(np.log2(4.0))
    assert stored[("u01", "song-a")][1] == pytest.approx(1.0)


def test_rating_col_empty_makes_a_rated_file_implicit(tmp_path: Path) -> None:
    source = tmp_path / "r.csv"
    source.write_text("user_id,item_id,rating\n1,10,5\n1,11,1\n2,10,3\n2,12,4\n3,11,2\n")
    db = tmp_path / "db.duckdb"
    out = _preprocess(
        "--dataset", "csv", "--source", source, "--rating-col", "", "--time-col", "",
        "--split", "random", "--db", db,
    )  # fmt: skip
    assert "implicit feedback" in out
    assert {r for r, _, _ in _stored(db).values()} == {1.0}


def test_named_rating_column_missing_is_still_refused(tmp_path: Path) -> None:
    source = tmp_path / "r.csv"
    source.write_text("user_id,item_id\n1,10\n2,11\n")
    run = cli(
        "preprocess", "--dataset", "csv", "--source", str(source), "--rating-col", "stars",
        "--time-col", "", "--split", "random", "--db", str(tmp_path / "db.duckdb"),
    )  # fmt: skip
    assert_user_error(run, 3, "no column 'stars'", "--rating-col ''")


@pytest.mark.parametrize("with_time", [True, False])
def test_implicit_parquet(tmp_path: Path, with_time: bool) -> None:
    frame = pl.DataFrame(
        {"user": ["a", "b", "b", "c", "a"], "item": [1, 2, 2, 3, 3], "t": [1, 2, 3, 4, 5]}
    )
    source = tmp_path / "p.parquet"
    frame.write_parquet(source)
    db = tmp_path / "db.duckdb"
    time = ["--time-col", "t", "--split", "time"] if with_time else ["--time-col", ""]
    split = [] if with_time else ["--split", "random"]
    out = _preprocess(
        "--dataset", "parquet", "--source", source, "--user-col", "user", "--item-col",
        "item", *time, *split, "--weight-transform", "none", "--db", db,
    )  # fmt: skip
    assert "implicit feedback, 1 duplicate (user, item) merged" in out
    assert _stored(db)[("b", "2")][1] == 2.0
    assert rows(db, "SELECT count(*) FROM ratings WHERE ts IS NULL") == [(0 if with_time else 4,)]


def _given_frame(n: int = 400, seed: int = 5) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 40, n)
    items = rng.integers(0, 60, n)
    frame = pl.DataFrame({"user": [f"u{u:03d}" for u in users], "item": items})
    frame = frame.unique(["user", "item"], keep="first", maintain_order=True)
    labels = np.where(rng.random(frame.height) < 0.2, "test", "train")
    labels[::17] = "val"  # the synonym
    return frame.with_columns(split=pl.Series(labels), plays=rng.integers(1, 50, frame.height))


GIVEN = ["--user-col", "user", "--item-col", "item", "--split", "given", "--split-col", "split"]


@pytest.mark.parametrize(
    "how", ["csv", "parquet", "parquet-out-of-core"], ids=["csv", "parquet", "out-of-core"]
)
def test_given_split_round_trips(tmp_path: Path, how: str) -> None:
    frame = _given_frame()
    source = tmp_path / ("g.csv" if how == "csv" else "g.parquet")
    if how == "csv":
        frame.write_csv(source)
    else:
        frame.write_parquet(source)
    dataset = "csv" if how == "csv" else "parquet"
    extra = ["--memory-mb", "512"] if how.endswith("out-of-core") else []
    db = tmp_path / "db.duckdb"
    out = _preprocess(
        "--dataset", dataset, "--source", source, *GIVEN, "--time-col", "", *extra,
        "--weight-col", "plays", "--weight-transform", "none", "--db", db,
    )  # fmt: skip
    stored = _stored(db)
    assert len(stored) == frame.height
    for user, item, label, plays in frame.iter_rows():
        _, weight, split = stored[(user, str(item))]
        assert split == ("train" if label == "train" else "val"), (user, item, label)
        assert weight == plays
    n_test = int((frame["split"] != "train").sum())
    assert f"train {frame.height - n_test:,} / test {n_test:,}" in out
    # Unseen users/items in test are counted as for any split.
    cold = rows(db, "SELECT n_val_cold_user, n_val_cold_item FROM dataset_meta")[0]
    expected_cold_items = sum(
        1
        for user, item, label, _ in frame.iter_rows()
        if label != "train" and not ((frame["item"] == item) & (frame["split"] == "train")).any()
    )
    assert cold[1] == expected_cold_items
    assert rows(db, "SELECT split_kind FROM dataset_meta") == [("given",)]


@pytest.mark.parametrize("out_of_core", [False, True])
@pytest.mark.parametrize(
    "labels, flags, fragments",
    [
        (["train", "test", "holdout"], [], ["row 2", "'holdout'", "train or test"]),
        (["test", "test", "val"], [], ["names no train row"]),
        (["train", "test", "train"], ["--split-col", "fold"], ["no column 'fold'", "--split-col"]),
    ],
    ids=["bad-value", "no-train", "missing-column"],
)
def test_given_split_refusals_leave_the_database(
    tmp_path: Path, labels: list[str], flags: list[str], fragments: list[str], out_of_core: bool
) -> None:
    db = tmp_path / "db.duckdb"
    good = tmp_path / "good.parquet"
    _given_frame().write_parquet(good)
    _preprocess("--dataset", "parquet", "--source", good, *GIVEN, "--time-col", "", "--db", db)
    before = snapshot(db)
    source = tmp_path / "bad.parquet"
    pl.DataFrame({"user": ["a", "b", "c"], "item": [1, 2, 3], "split": labels}).write_parquet(
        source
    )
    args = [*GIVEN, *flags] if not flags else [*GIVEN[:-1], flags[1]]
    run = cli(
        "preprocess", "--dataset", "parquet", "--source", str(source), *args,
        "--time-col", "", *(["--memory-mb", "512"] if out_of_core else []), "--db", str(db),
    )  # fmt: skip
    assert_user_error(run, 3, *fragments)
    assert snapshot(db) == before


def test_given_split_csv_names_the_line(tmp_path: Path) -> None:
    source = tmp_path / "g.csv"
    source.write_text("user,item,split\na,1,train\nb,2,Test\n")
    run = cli(
        "preprocess", "--dataset", "csv", "--source", str(source), *GIVEN, "--time-col", "",
        "--db", str(tmp_path / "db.duckdb"),
    )  # fmt: skip
    assert_user_error(run, 3, "line 3", "column split", "'Test'")


def test_given_pair_in_both_splits_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "g.csv"
    source.write_text("user,item,split\na,1,train\nb,2,train\na,1,train\na,1,test\n")
    run = cli(
        "preprocess", "--dataset", "csv", "--source", str(source), *GIVEN, "--time-col", "",
        "--db", str(tmp_path / "db.duckdb"),
    )  # fmt: skip
    assert_user_error(run, 3, "line 2 (train) and line 5 (test)", "(user a, item 1)", "both")


def test_split_col_without_given_is_refused(tmp_path: Path) -> None:
    run = cli(
        "preprocess", "--dataset", "csv", "--source", str(tmp_path / "x.csv"), "--split-col",
        "split", "--db", str(tmp_path / "db.duckdb"),
    )  # fmt: skip
    assert_user_error(run, 2, "--split-col", "--split given")


def test_append_reuses_the_mapping_and_the_given_split(tmp_path: Path) -> None:
    base = _given_frame(300, seed=1)
    source = tmp_path / "base.csv"
    base.write_csv(source, separator=";")
    db = tmp_path / "db.duckdb"
    _preprocess(
        "--dataset", "csv", "--source", source, "--separator", ";", *GIVEN, "--time-col", "",
        "--weight-col", "plays", "--db", db,
    )  # fmt: skip
    day = pl.DataFrame(
        {
            "user": ["u000", "new-user", "new-user", "u001"],
            "item": [999, 5, 6, 998],
            "split": ["train", "train", "test", "test"],
            "plays": [3, 1, 1, 7],
        }
    )
    extra = tmp_path / "day.csv"
    day.write_csv(extra, separator=";")
    # Nothing but the file: columns, separator, weight and split come from the preprocess.
    out = ok(cli("preprocess", "--append", "--source", str(extra), "--db", str(db))).stdout
    assert "4 new ratings" in out
    stored = _stored(db)
    for user, item, label, plays in day.iter_rows():
        _, weight, split = stored[(user, str(item))]
        assert split == ("train" if label == "train" else "val")
        assert weight == pytest.approx(np.log2(1 + plays))
    n_train, n_val = rows(db, "SELECT n_train, n_val FROM dataset_meta")[0]
    assert (n_train, n_val) == tuple(
        rows(db, f"SELECT count(*) FROM ratings WHERE split = '{s}'")[0][0]
        for s in ("train", "val")
    )
    # (u001, 998): item 998 is new and only in test, so it is a cold item.
    assert rows(
        db,
        "SELECT cold_item FROM ratings JOIN items USING (item_idx) WHERE item_id = '998'",
    ) == [(True,)]


def test_append_of_explicit_ratings_to_implicit_data_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "plays.csv"
    source.write_text(IMPLICIT_CSV)
    db = tmp_path / "db.duckdb"
    _preprocess("--dataset", "csv", "--source", source, *NAMES, "--time-col", "when", "--db", db)
    before = snapshot(db)
    rated = tmp_path / "rated.csv"
    rated.write_text("who,what,when,stars\nu01,song-z,1700000900,4\n")
    run = cli(
        "preprocess", "--append", "--source", str(rated), "--rating-col", "stars", "--db", str(db)
    )
    assert_user_error(run, 3, "explicit feedback", "implicit")
    assert snapshot(db) == before


@pytest.mark.parametrize("out_of_core", [False, True])
def test_hive_ids_are_the_text_of_the_folder_names(tmp_path: Path, out_of_core: bool) -> None:
    root = tmp_path / "parts"
    for user in ("007", "7"):
        folder = root / f"user={user}"
        folder.mkdir(parents=True)
        pl.DataFrame({"item": ["a", "b"], "rating": [4.0, 2.0], "ts": [1, 2]}).write_parquet(
            folder / "p.parquet"
        )
    db = tmp_path / "db.duckdb"
    _preprocess(
        "--dataset", "parquet", "--source", root, "--user-col", "user", "--item-col", "item",
        "--time-col", "ts", *(["--memory-mb", "512"] if out_of_core else []), "--db", db,
    )  # fmt: skip
    assert sorted(rows(db, "SELECT user_id FROM users")) == [("007",), ("7",)]


@pytest.mark.parametrize("out_of_core", [False, True])
def test_given_pair_in_both_splits_parquet(tmp_path: Path, out_of_core: bool) -> None:
    source = tmp_path / "g.parquet"
    pl.DataFrame(
        {"user": ["a", "b", "a", "a"], "item": [1, 2, 1, 1], "split": ["test", "train"] * 2}
    ).write_parquet(source)
    run = cli(
        "preprocess", "--dataset", "parquet", "--source", str(source), *GIVEN,
        *(["--memory-mb", "512"] if out_of_core else []), "--db", str(tmp_path / "db.duckdb"),
    )  # fmt: skip
    assert_user_error(run, 3, "row 3 (train) and row 0 (test)", "(user a, item 1)")
    assert not (tmp_path / "db.duckdb").exists()
