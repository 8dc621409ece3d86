"""Generic CSV and Parquet sources and the synthetic generator, end to end through
`mfbatch preprocess`, checked table by table (expected tables worked out by hand).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import polars as pl
import pytest
from conftest import Preprocess, Query, assert_norm, items, meta, ok, ratings, sha256, users, utc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mfbatch.config import DataConfig, SplitConfig
from mfbatch.data import DataLoaderFactory

# --- Generic CSV / Parquet -------------------------------------------------------------------

GENERIC_CSV = (
    "uid;iid;score;when\n"
    "alice;m-b;7;2021-03-01T10:00:00\n"
    "bob;m-a;3;2021-03-02T10:00:00\n"
    "alice;m-a;10;2021-03-03T10:00:00\n"
    "carol;m-c;1;2021-03-04T10:00:00\n"
    "bob;m-c;4;2021-03-05T10:00:00\n"
    "alice;m-b;8;2021-03-06T10:00:00\n"  # alice re-rates m-b: 8 replaces 7
    "Zoë;m-a;5;2021-03-07T10:00:00\n"
)
COLUMN_FLAGS = (
    "--user-col",
    "uid",
    "--item-col",
    "iid",
    "--rating-col",
    "score",
    "--time-col",
    "when",
)


def test_generic_csv_custom_columns_string_ids(
    tmp_path: Path, preprocess_cli: Preprocess, query: Query
) -> None:
    source = tmp_path / "ratings.csv"
    source.write_text(GENERIC_CSV, encoding="utf-8")
    db = tmp_path / "out.duckdb"
    run = preprocess_cli(
        "--dataset", "csv", "--source", source, "--separator", ";", *COLUMN_FLAGS, "--db", db,
        "--split", "time",  # the train counts below are the global cutoff's
    )  # fmt: skip
    ok(run)
    assert run.stdout.startswith("preprocessed 7 rows from csv (1 duplicate")
    # String ids map in byte order ("Z" < "a"); the scale is inferred from the data: 1..10.
    assert users(query, db) == [
        (0, "Zoë", 1, 0),
        (1, "alice", 2, 2),
        (2, "bob", 2, 2),
        (3, "carol", 1, 1),
    ]
    assert items(query, db) == [
        (0, "m-a", None, None, 3, 2),
        (1, "m-b", None, None, 1, 1),
        (2, "m-c", None, None, 2, 2),
    ]
    rows = ratings(query, db)
    assert [(u, i, r, ts, s, cu, ci) for u, i, r, _, ts, s, cu, ci in rows] == [
        (0, 0, 5.0, datetime(2021, 3, 7, 10), "val", True, False),
        (1, 0, 10.0, datetime(2021, 3, 3, 10), "train", False, False),
        (1, 1, 8.0, datetime(2021, 3, 6, 10), "train", False, False),
        (2, 0, 3.0, datetime(2021, 3, 2, 10), "train", False, False),
        (2, 2, 4.0, datetime(2021, 3, 5, 10), "train", False, False),
        (3, 2, 1.0, datetime(2021, 3, 4, 10), "train", False, False),
    ]
    assert [r[3] for r in rows] == pytest.approx([4 / 9, 1.0, 7 / 9, 2 / 9, 3 / 9, 0.0])
    m = meta(query, db)
    assert (m["loader"], m["layout"], m["rating_min"], m["rating_max"]) == (
        "csv",
        "csv",
        1.0,
        10.0,
    )
    assert (m["rows_in"], m["duplicates_dropped"]) == (7, 1)
    assert m["source_sha256"] == sha256(source)


def test_generic_csv_integer_ids_unix_seconds_declared_scale(
    tmp_path: Path, preprocess_cli: Preprocess, query: Query
) -> None:
    source = tmp_path / "r.csv"
    source.write_text(
        "user_id,item_id,rating,timestamp\n"
        "20,300,2,1600000000\n"
        "3,300,3,1600000100\n"
        "20,40,4,1600000200\n"
        "3,40,1,1600000300\n",
        encoding="utf-8",
    )
    db = tmp_path / "out.duckdb"
    ok(
        preprocess_cli(
            "--dataset",
            "csv",
            "--source",
            source,
            "--rating-min",
            "0",
            "--rating-max",
            "5",
            "--split",
            "random",
            "--val-fraction",
            "0.5",
            "--db",
            db,
        )
    )
    assert [r[:2] for r in users(query, db)] == [(0, "3"), (1, "20")]  # numeric order
    assert [r[:2] for r in items(query, db)] == [(0, "40"), (1, "300")]
    rows = ratings(query, db)
    assert [(u, i, r, ts) for u, i, r, _, ts, *_ in rows] == [
        (0, 0, 1.0, utc(1600000300)),
        (0, 1, 3.0, utc(1600000100)),
        (1, 0, 4.0, utc(1600000200)),
        (1, 1, 2.0, utc(1600000000)),
    ]
    assert_norm(rows, 0.0, 5.0)
    assert [r[5] for r in rows].count("val") == 2
    m = meta(query, db)
    assert (m["rating_min"], m["rating_max"], m["split_kind"], m["time_cutoff"]) == (
        0.0,
        5.0,
        "random",
        None,
    )


def test_parquet_custom_columns_string_ids_timezone(
    tmp_path: Path, preprocess_cli: Preprocess, query: Query
) -> None:
    source = tmp_path / "events.parquet"
    pl.DataFrame(
        {
            "customer": ["c2", "c1", "c2", "c10"],
            "sku": [501, 77, 77, 501],
            "stars": [1, 4, 2, 5],  # integer ratings are read as numbers too
            "at": pl.Series(
                [
                    datetime(2022, 1, 1, 12),
                    datetime(2022, 1, 2, 12),
                    datetime(2022, 1, 3, 12),
                    datetime(2022, 1, 4, 12),
                ]
            ).dt.replace_time_zone("Europe/Paris"),
            "ignored": ["x", "y", "z", "w"],
        }
    ).write_parquet(source)
    db = tmp_path / "out.duckdb"
    flags = ("--user-col", "customer", "--item-col", "sku", "--rating-col", "stars")
    ok(preprocess_cli("--dataset", "parquet", "--source", source, *flags, "--time-col", "at",
                      "--split", "time",
                      "--db", db))  # fmt: skip
    assert [r[:2] for r in users(query, db)] == [(0, "c1"), (1, "c10"), (2, "c2")]
    assert [r[:2] for r in items(query, db)] == [(0, "77"), (1, "501")]
    rows = ratings(query, db)
    # Paris is UTC+1 in January: stored timestamps are naive UTC.
    assert [(u, i, r, ts, s) for u, i, r, _, ts, s, *_ in rows] == [
        (0, 0, 4.0, datetime(2022, 1, 2, 11), "train"),
        (1, 1, 5.0, datetime(2022, 1, 4, 11), "val"),
        (2, 0, 2.0, datetime(2022, 1, 3, 11), "train"),
        (2, 1, 1.0, datetime(2022, 1, 1, 11), "train"),
    ]
    assert_norm(rows, 1.0, 5.0)
    m = meta(query, db)
    assert (m["loader"], m["layout"], m["rating_min"], m["rating_max"]) == (
        "parquet",
        "parquet",
        1.0,
        5.0,
    )
    assert m["source_sha256"] == sha256(source)


def test_parquet_without_time_column_random_split(
    tmp_path: Path, preprocess_cli: Preprocess, query: Query
) -> None:
    source = tmp_path / "r.parquet"
    pl.DataFrame(
        {"user_id": [1, 1, 2, 2, 3], "item_id": [1, 2, 1, 3, 2], "rating": [0.0, 1, 0.5, 1, 0]}
    ).write_parquet(source)
    db = tmp_path / "out.duckdb"
    args = ("--dataset", "parquet", "--source", source, "--time-col", "", "--db", db)
    ok(preprocess_cli(*args, "--split", "random", "--seed", "3"))
    first = ratings(query, db)
    assert len(first) == 5 and {r[4] for r in first} == {None}
    assert [r[5] for r in first].count("val") == 1  # round(0.1 * 5) = 0.5 -> at least 1
    assert [r[3] for r in first] == [r[2] for r in first]  # scale inferred as 0..1
    ok(preprocess_cli(*args, "--split", "random", "--seed", "3"))
    assert ratings(query, db) == first  # the seed decides, not the run


# --- Synthetic -------------------------------------------------------------------------------

SYNTH = ("--dataset", "synthetic", "--users", "60", "--items", "40", "--ratings-per-user", "8",
         "--split", "time")  # fmt: skip


def test_synthetic(tmp_path: Path, preprocess_cli: Preprocess, query: Query) -> None:
    db = tmp_path / "out.duckdb"
    ok(preprocess_cli(*SYNTH, "--data-seed", "5", "--db", db))
    m = meta(query, db)
    assert (m["loader"], m["layout"], m["rating_min"], m["rating_max"]) == (
        "synthetic",
        "synthetic",
        1.0,
        5.0,
    )
    assert m["source"] == "synthetic:users=60,items=40,ratings_per_user=8,seed=5"
    rows = ratings(query, db)
    assert len(rows) == m["n_ratings"] == m["n_train"] + m["n_val"] == m["rows_in"]
    assert {r[2] for r in rows} <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert len({r[2] for r in rows}) >= 3
    assert_norm(rows, 1.0, 5.0)
    assert len({(r[0], r[1]) for r in rows}) == len(rows)
    us = users(query, db)
    assert [u[0] for u in us] == list(range(len(us))) == list(range(m["n_users"]))
    assert 1 <= len(us) <= 60 and all(1 <= int(u[1]) <= 60 for u in us)
    assert sum(u[2] for u in us) == len(rows)
    assert sum(i[4] for i in items(query, db)) == len(rows)
    # The time split holds out the newest ratings.
    train_ts = [r[4] for r in rows if r[5] == "train"]
    val_ts = [r[4] for r in rows if r[5] == "val"]
    assert max(train_ts) <= min(val_ts) == m["time_cutoff"]

    # Same seed, same data; another seed, other data.
    again, other = tmp_path / "again.duckdb", tmp_path / "other.duckdb"
    ok(preprocess_cli(*SYNTH, "--data-seed", "5", "--db", again))
    ok(preprocess_cli(*SYNTH, "--data-seed", "6", "--db", other))
    assert ratings(query, again) == rows
    assert meta(query, again)["dataset_sha256"] == m["dataset_sha256"]
    assert ratings(query, other) != rows
    assert meta(query, other)["dataset_sha256"] != m["dataset_sha256"]


def test_generic_csv_ids_are_taken_as_written(
    tmp_path: Path, preprocess_cli: Preprocess, query: Query
) -> None:
    """ "007" and "7" are two users: reading them as numbers would merge them."""
    source = tmp_path / "r.csv"
    source.write_text(
        "user_id,item_id,rating,timestamp\n007,0100,1,10\n7,100,5,11\n7,0100,3,12\n",
        encoding="utf-8",
    )
    db = tmp_path / "out.duckdb"
    ok(preprocess_cli("--dataset", "csv", "--source", source, "--db", db, "--split", "time"))
    assert [u[:3] for u in users(query, db)] == [(0, "007", 1), (1, "7", 2)]
    assert [i[:2] + i[4:] for i in items(query, db)] == [(0, "0100", 2, 1), (1, "100", 1, 1)]
    assert meta(query, db)["duplicates_dropped"] == 0


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(
        st.tuples(
            st.from_regex(r"[0-9]{1,3}|[0-9a-z]{1,3}", fullmatch=True),
            st.from_regex(r"[0-9]{1,3}", fullmatch=True),
            st.integers(1, 5),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_generic_csv_id_mapping_reproduces_the_raw_ids(
    rows: list[tuple[str, str, int]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    source = tmp_path_factory.mktemp("ids") / "r.csv"
    source.write_text(
        "user_id,item_id,rating\n" + "".join(f"{u},{i},{r}\n" for u, i, r in rows),
        encoding="utf-8",
    )
    data = DataConfig(dataset="csv", source=source, time_col=None, rating_min=1, rating_max=5)
    loader = DataLoaderFactory.get_loader(data, SplitConfig(kind="random"))
    prepared = loader.preprocess_data(loader.load_data())

    for table, position in (("users", 0), ("items", 1)):
        frame = getattr(prepared, table)
        raw = {row[position] for row in rows}
        ids = frame[f"{table[:-1]}_id"].to_list()
        assert set(ids) == raw and len(ids) == len(raw)  # a bijection onto the raw ids
        numeric = all(x.isdigit() and x == str(int(x)) for x in raw)
        assert ids == sorted(raw, key=int if numeric else None)
    pairs = {(u, i) for u, i, _ in rows}
    back = prepared.ratings.join(prepared.users, on="user_idx").join(prepared.items, on="item_idx")
    assert set(zip(back["user_id"], back["item_id"], strict=True)) == pairs
    assert back.height == len(pairs)


def test_the_default_split_is_user_time(
    tmp_path: Path, preprocess_cli: Preprocess, query: Query
) -> None:
    """Every validated user keeps a history to recommend from: `evaluate` measures them all."""
    db = tmp_path / "out.duckdb"
    run = ok(preprocess_cli(*SYNTH[:-2], "--db", db))
    assert "(val with unseen user 0, " in run.stdout, run.stdout
    assert meta(query, db)["split_kind"] == "user-time"
    rows = ratings(query, db)
    for user in {r[0] for r in rows}:
        train = [r[4] for r in rows if r[0] == user and r[5] == "train"]
        val = [r[4] for r in rows if r[0] == user and r[5] == "val"]
        assert train and (not val or max(train) <= min(val)), user
    assert sum(r[5] == "val" for r in rows) > 0
