"""`preprocess --memory-mb`: the out-of-core path writes the in-memory path's tables.

Both paths run on the same Parquet files and every table is compared row for row in its
stored order. A few hundred ratings per bucket make a small input cross many buckets, so
what spans buckets (a user's duplicates, timestamps tied at the `time` cutoff, the
`random` draw, item counts) is exercised, not just one bucket that holds everything.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import Snapshot, rows

import mfbatch.store.db
from mfbatch.config import load_config
from mfbatch.stages.preprocess import WORK_PREFIX, PreprocessSummary, preprocess


def _ratings(ids: str, seed: int = 1) -> pa.Table:
    """Ratings with what the paths must agree on: re-ratings (some at the same second, so
    file order decides), many ratings at the same second, users and items seen once (cold
    in validation), a blank row, and ids as integers or as text."""
    rng = np.random.default_rng(seed)
    n = 4_000
    users = rng.integers(1, 300, n)
    items = rng.integers(1, 120, n)
    ts = rng.integers(1_000_000_000, 1_000_000_200, n)  # ~20 ratings per second
    # Re-ratings: 300 copies of earlier pairs, half at the very same second.
    again = rng.choice(n, 300, replace=False)
    users = np.concatenate([users, users[again], np.arange(1000, 1040)])
    items = np.concatenate([items, items[again], np.arange(500, 540)])
    same = rng.random(300) < 0.5
    ts = np.concatenate([ts, np.where(same, ts[again], ts[again] + 7), np.full(40, 1_000_000_199)])
    ratings = rng.integers(1, 6, len(users)).astype(np.float64)
    columns: dict[str, Any] = {
        "user_id": users if ids == "int" else [f"u{u:04d}" for u in users],
        "item_id": items if ids == "int" else [f"i-{i}" for i in items],
        "rating": ratings,
        "timestamp": ts,
    }
    table = pa.table(columns)
    blank = pa.table({name: pa.nulls(1, table.schema.field(name).type) for name in columns})
    return pa.concat_tables([table.slice(0, 2000), blank, table.slice(2000)])


def _tables(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every dataset table in stored order; run-specific columns (config, timings) out."""
    with duckdb.connect(str(db), read_only=True) as con:
        return {
            "users": con.execute("SELECT * FROM users").fetchall(),
            "items": con.execute("SELECT * FROM items").fetchall(),
            "ratings": con.execute("SELECT * FROM ratings").fetchall(),
            "dataset_meta": con.execute(
                "SELECT * EXCLUDE (config, seconds, created_at) FROM dataset_meta"
            ).fetchall(),
            "dataset_versions": con.execute(
                "SELECT * EXCLUDE (created_at) FROM dataset_versions"
            ).fetchall(),
        }


def _run(
    source: Path, db: Path, split: str, memory_mb: int | None, bucket_rows: int | None = None
) -> PreprocessSummary:
    config = load_config(
        db=db,
        overrides={
            "data": {"dataset": "parquet", "source": source},
            "split": {"kind": split, "val_fraction": 0.2, "seed": 5},
            "preprocess": {"memory_mb": memory_mb},
        },
    )
    return preprocess(config=config, bucket_rows=bucket_rows)


@pytest.mark.parametrize("split", ["time", "user-time", "random"])
@pytest.mark.parametrize("ids", ["int", "text"])
@pytest.mark.parametrize("bucket_rows", [150, 1_000, None])
def test_the_same_tables_as_in_memory(
    tmp_path: Path, split: str, ids: str, bucket_rows: int | None
) -> None:
    source = tmp_path / "ratings.parquet"
    pq.write_table(_ratings(ids), source)
    in_memory = _run(source, tmp_path / "memory.duckdb", split, None)
    out_of_core = _run(source, tmp_path / "buckets.duckdb", split, 512, bucket_rows)
    expected = _tables(tmp_path / "memory.duckdb")
    # The input exercises what it is meant to.
    assert in_memory.duplicates_dropped > 0
    if split != "user-time":  # which keeps every user's oldest rating in train
        assert in_memory.n_val_cold_user > 0 and in_memory.n_val_cold_item > 0
    assert _tables(tmp_path / "buckets.duckdb") == expected
    assert dataclasses.replace(out_of_core, db=in_memory.db, seconds=0) == dataclasses.replace(
        in_memory, seconds=0
    )
    assert not list(tmp_path.glob(WORK_PREFIX + "*"))


def test_timezone_aware_times_and_a_hive_folder(tmp_path: Path) -> None:
    table = _ratings("int", seed=2)
    seconds = table.column("timestamp").to_numpy(zero_copy_only=False)
    stamps = [
        None if np.isnan(s) else datetime.fromtimestamp(int(s), tz=timezone.utc) for s in seconds
    ]
    table = table.set_column(3, "timestamp", pa.array(stamps, pa.timestamp("ms", tz="Asia/Tokyo")))
    table = table.append_column("month", pa.array(np.arange(table.num_rows) % 3))
    folder = tmp_path / "parts"
    pq.write_to_dataset(table, folder, partition_cols=["month"])
    _run(folder, tmp_path / "memory.duckdb", "time", None)
    _run(folder, tmp_path / "buckets.duckdb", "time", 512, 200)
    assert _tables(tmp_path / "buckets.duckdb") == _tables(tmp_path / "memory.duckdb")


def test_the_cli_flag(tmp_path: Path, preprocess_cli: Any) -> None:
    source = tmp_path / "ratings.parquet"
    pq.write_table(_ratings("int"), source)
    for db, extra in (("memory.duckdb", []), ("flag.duckdb", ["--memory-mb", "512"])):
        run = preprocess_cli(
            "--dataset", "parquet", "--source", source, "--db", tmp_path / db, *extra
        )
        assert run.exit_code == 0, (run.stderr, run.exception)
    assert _tables(tmp_path / "flag.duckdb") == _tables(tmp_path / "memory.duckdb")
    with duckdb.connect(str(tmp_path / "flag.duckdb"), read_only=True) as con:
        stored = con.execute(
            "SELECT config->>'$.preprocess.memory_mb' FROM dataset_meta"
        ).fetchall()
    assert stored == [("512",)]


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"user_id": [1, None, 3]}, "row 1, column user_id: value is missing"),
        ({"rating": [1.0, float("inf"), 2.0]}, "row 1, column rating: inf is not a finite number"),
        ({"timestamp": [1, 2, -5 * 10**18]}, "is outside 1900-2100 as a time"),
    ],
)
def test_bad_values_get_the_in_memory_message(
    tmp_path: Path, preprocess_cli: Any, values: dict[str, list[Any]], fragment: str
) -> None:
    base: dict[str, list[Any]] = {
        "user_id": [1, 2, 3],
        "item_id": [1, 1, 2],
        "rating": [1.0, 2.0, 3.0],
        "timestamp": [1_000_000_000, 1_000_000_001, 1_000_000_002],
    }
    source = tmp_path / "bad.parquet"
    pq.write_table(pa.table({**base, **values}), source)
    messages = []
    for extra in ([], ["--memory-mb", "512"]):
        run = preprocess_cli(
            "--dataset", "parquet", "--source", source, "--db", tmp_path / "x.duckdb", *extra
        )
        assert run.exit_code == 3, (run.stderr, run.exception)
        messages.append(run.stderr.strip().splitlines()[-1])
    assert fragment in messages[0]
    assert messages[1] == messages[0]
    assert not (tmp_path / "x.duckdb").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--dataset", "synthetic", "--memory-mb", "512"], "only a Parquet source"),
        (["--dataset", "parquet", "--memory-mb", "100"], "--memory-mb: at least 512"),
        (["--dataset", "parquet", "--memory-mb", "512", "--append"], "--append reads its file"),
        (
            ["--dataset", "parquet", "--memory-mb", "512", "--time-col", "when"],
            "only the in-memory",
        ),
    ],
)
def test_what_it_refuses_is_one_line(
    tmp_path: Path, preprocess_cli: Any, user_error: Any, args: list[str], fragment: str
) -> None:
    source = tmp_path / "r.parquet"
    pq.write_table(
        pa.table(
            {
                "user_id": [1, 2],
                "item_id": [1, 2],
                "rating": [1.0, 2.0],
                "when": ["2020-01-01", "2020-01-02"],
            }
        ),
        source,
    )
    run = preprocess_cli(*args, "--source", source, "--db", tmp_path / "x.duckdb")
    user_error(run, 2, fragment)


@pytest.mark.parametrize(
    "failure", [duckdb.IOException("disk full (injected)"), KeyboardInterrupt()]
)
def test_a_failure_midway_keeps_the_previous_dataset(
    good_db: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    db_snapshot: Snapshot,
    failure: BaseException,
) -> None:
    source = tmp_path / "ratings.parquet"
    pq.write_table(_ratings("int"), source)
    before = db_snapshot(good_db)
    real = mfbatch.store.db.run
    inserted = []

    def failing(con: duckdb.DuckDBPyConnection, name: str, **params: Any) -> Any:
        if name == "insert_ratings_from_parquet":
            inserted.append(params["path"])
            if len(inserted) == 3:  # after two buckets are in
                raise failure
        return real(con, name, **params)

    monkeypatch.setattr(mfbatch.store.db, "run", failing)
    with pytest.raises((mfbatch.errors.DatabaseError, KeyboardInterrupt)):
        _run(source, good_db, "time", 512, 300)
    monkeypatch.undo()
    assert len(inserted) == 3
    assert db_snapshot(good_db) == before
    assert not list(good_db.parent.glob(WORK_PREFIX + "*"))


def test_buckets_a_killed_run_left_are_removed(tmp_path: Path) -> None:
    """A run killed outright (SIGKILL) can't clean up; the next one removes its folder,
    and leaves alone one whose owner still runs and one created a moment ago."""
    source = tmp_path / "ratings.parquet"
    pq.write_table(_ratings("int"), source)
    dead = tmp_path / f"{WORK_PREFIX}dead"
    dead.mkdir()
    (dead / "bucket-0.arrow").write_bytes(b"half a bucket")
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    (dead / "owner.pid").write_text(gone.stdout.strip())
    unowned_old = tmp_path / f"{WORK_PREFIX}old"
    unowned_old.mkdir()
    os.utime(unowned_old, (1_000_000_000, 1_000_000_000))
    unowned_new = tmp_path / f"{WORK_PREFIX}new"  # mkdtemp'd, owner not written yet
    unowned_new.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f"{WORK_PREFIX}live"
        live.mkdir()
        (live / "owner.pid").write_text(str(sleeper.pid))
        _run(source, tmp_path / "buckets.duckdb", "random", 512, 300)
        left = sorted(p.name for p in tmp_path.glob(WORK_PREFIX + "*"))
        assert left == sorted([live.name, unowned_new.name])
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("split", ["time", "given"])
@pytest.mark.parametrize("bucket_rows", [150, None])
def test_implicit_weighted_the_same_tables_as_in_memory(
    tmp_path: Path, split: str, bucket_rows: int | None
) -> None:
    """Implicit feedback with duplicates (weights summed) and a weight column, with a time
    split or a given one: the buckets give the in-memory tables."""
    rng = np.random.default_rng(11)
    n = 3_000
    users = rng.integers(0, 150, n)
    items = rng.integers(0, 90, n)
    # A pair's split follows from the pair, so duplicates never straddle train and test.
    held = (users * 7 + items) % 5 == 0
    table = pa.table(
        {
            "user_id": [f"u{u}" for u in users],
            "item_id": items,
            "timestamp": rng.integers(1_000_000_000, 1_100_000_000, n),
            "plays": rng.integers(0, 40, n).astype(np.float64),
            "fold": np.where(held, "test", "train"),
        }
    )
    source = tmp_path / "plays.parquet"
    pq.write_table(table, source)

    def run(db: Path, memory_mb: int | None) -> PreprocessSummary:
        given = {"kind": "given", "split_col": "fold"} if split == "given" else {"kind": split}
        config = load_config(
            db=db,
            overrides={
                "data": {"dataset": "parquet", "source": source, "weight_col": "plays"},
                "split": given,
                "preprocess": {"memory_mb": memory_mb},
            },
        )
        return preprocess(config=config, bucket_rows=bucket_rows)

    in_memory = run(tmp_path / "memory.duckdb", None)
    out_of_core = run(tmp_path / "buckets.duckdb", 512)
    assert in_memory.feedback == "implicit" and in_memory.duplicates_dropped > 0
    assert _tables(tmp_path / "buckets.duckdb") == _tables(tmp_path / "memory.duckdb")
    assert dataclasses.replace(out_of_core, db=in_memory.db, seconds=0) == dataclasses.replace(
        in_memory, seconds=0
    )
    # Summed before the transform: a pair's weight is log2(1 + its plays added up).
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    summed = frame.group_by("user_id", "item_id").agg(pl.col("plays").sum())
    stored = dict(
        rows(
            tmp_path / "memory.duckdb",
            "SELECT u.user_id || '/' || i.item_id, r.weight FROM ratings r "
            "JOIN users u USING (user_idx) JOIN items i USING (item_idx)",
        )
    )
    for user, item, plays in summed.iter_rows():
        assert stored[f"{user}/{item}"] == pytest.approx(np.log2(1 + plays))
