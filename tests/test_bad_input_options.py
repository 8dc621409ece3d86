"""Bad sources, rating scales, splits, options and databases: a non-zero exit, one
`error:` line (no traceback), and the database exactly as it was before (`against`, in
conftest.py, checks it after every test).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    CONFIG_ERROR,
    DATABASE_ERROR,
    INPUT_ERROR,
    Preprocess,
    Snapshot,
    UserError,
    write,
)

# --- scale, source, split, options -----------------------------------------------------------


def test_rating_scale_that_cannot_be_inferred(
    tmp_path: Path, against: Callable[..., Any], user_error: UserError
) -> None:
    source = write(
        tmp_path / "likes.csv", "user_id,item_id,rating,timestamp\n1,1,1,10\n1,2,1,11\n2,1,1,12\n"
    )
    user_error(
        against("--dataset", "csv", "--source", source),
        INPUT_ERROR,
        str(source),
        "every rating is 1.0",
        "--rating-min and --rating-max",
    )


@pytest.mark.parametrize("dataset", ["ml-1m", "ml-100k", "csv", "parquet"])
def test_source_that_is_not_there(
    dataset: str, tmp_path: Path, against: Callable[..., Any], user_error: UserError
) -> None:
    missing = tmp_path / "nowhere" / "ratings.zip"
    user_error(
        against("--dataset", dataset, "--source", missing),
        INPUT_ERROR,
        "--source",
        str(missing),
        "does not exist",
    )


def test_source_that_is_a_truncated_zip(
    tmp_path: Path, layouts: Any, against: Callable[..., Any], user_error: UserError
) -> None:
    whole = layouts.write_zip(tmp_path / "whole.zip", layouts.ML_1M).read_bytes()
    source = write(tmp_path / "ml-1m.zip", whole[: len(whole) // 2])
    user_error(against("--source", source), INPUT_ERROR, str(source), "not a readable zip")


def test_folder_without_movielens_files(
    tmp_path: Path, against: Callable[..., Any], user_error: UserError
) -> None:
    write(tmp_path / "data" / "notes.txt", "hello")
    user_error(
        against("--source", tmp_path / "data"),
        INPUT_ERROR,
        "holds no MovieLens ratings file",
        "notes.txt",
        "--dataset csv",
    )


@pytest.mark.parametrize("member", ["../evil", "/etc/evil", "..\\evil", "ml-1m/../../evil"])
def test_unsafe_zip_member_path(
    member: str, tmp_path: Path, against: Callable[..., Any], user_error: UserError
) -> None:
    source = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(source, "w") as archive:
        archive.writestr("ml-1m/ratings.dat", b"1::1::5::978300760\n2::1::3::978300761\n")
        archive.writestr(zipfile.ZipInfo(member), b"owned")
    user_error(
        against("--source", source), INPUT_ERROR, str(source), "unsafe member path", repr(member)
    )
    assert not (tmp_path.parent / "evil").exists()


@pytest.mark.parametrize("split", ["time", "user-time"])
def test_time_split_without_a_time_column(
    split: str, tmp_path: Path, against: Callable[..., Any], user_error: UserError
) -> None:
    source = write(tmp_path / "r.csv", "user_id,item_id,rating\n1,1,1\n1,2,3\n2,1,5\n")
    # The default time column is not in the file.
    user_error(
        against("--dataset", "csv", "--source", source, "--split", split),
        INPUT_ERROR,
        str(source),
        "no column 'timestamp' for ts",
        "--time-col",
        "--split random",
    )
    # Told there is none: the split can't be made.
    user_error(
        against("--dataset", "csv", "--source", source, "--split", split, "--time-col", ""),
        INPUT_ERROR,
        str(source),
        f"--split {split} needs a timestamp",
        "--split random",
    )


def test_time_split_with_a_time_missing_on_one_line(
    tmp_path: Path, against: Callable[..., Any], user_error: UserError
) -> None:
    source = write(tmp_path / "r.csv", "user_id,item_id,rating,timestamp\n1,1,1,5\n1,2,3,\n")
    user_error(
        against("--dataset", "csv", "--source", source, "--split", "time"),
        INPUT_ERROR,
        f"{source} line 3, column timestamp",
        "value is missing",
        "--split time needs a time",
    )


@pytest.mark.parametrize("fraction", ["0", "1", "1.5", "-0.1", "nan"])
def test_bad_val_fraction(
    fraction: str, against: Callable[..., Any], user_error: UserError, ml1m_zip: Path
) -> None:
    user_error(
        against("--source", ml1m_zip, "--val-fraction", fraction),
        CONFIG_ERROR,
        "--val-fraction",
        "strictly between 0 and 1",
    )


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (("--split", "weekly"), "--split: 'weekly' is not one of time, user-time, random"),
        (("--dataset", "ml-2m"), "--dataset: unknown dataset 'ml-2m'"),
        (("--dataset", "csv", "--separator", ";;"), "--separator: must be a single character"),
        (("--rating-min", "1"), "--rating-min/--rating-max: give both or neither"),
        (("--rating-min", "5", "--rating-max", "1"), "must be below --rating-max"),
        (("--dataset", "synthetic", "--users", "0"), "--users/--items"),
    ],
)
def test_bad_option(
    args: tuple[str, ...], expect: str, against: Callable[..., Any], user_error: UserError
) -> None:
    user_error(against(*args), CONFIG_ERROR, expect)


def test_config_file_with_an_unknown_key(
    tmp_path: Path, against: Callable[..., Any], user_error: UserError
) -> None:
    config = write(tmp_path / "mf.toml", '[data]\ndataset = "ml-1m"\nratingz = 5\n')
    user_error(
        against("--config", config), CONFIG_ERROR, f"{config} [data]: unknown key(s) ratingz"
    )


# --- the database ------------------------------------------------------------------------------


def test_database_locked_by_another_process(
    good_db: Path, ml1m_zip: Path, preprocess_cli: Preprocess, db_snapshot: Snapshot,
    user_error: UserError,
) -> None:  # fmt: skip
    before = db_snapshot(good_db)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, duckdb\n"
            "con = duckdb.connect(sys.argv[1])\n"
            "print('holding', flush=True)\n"
            "time.sleep(120)\n",
            str(good_db),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(60, holder.kill)  # never hang the suite on a stuck child
    watchdog.start()
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "holding"  # the lock is taken
        watchdog.cancel()
        run = preprocess_cli("--source", ml1m_zip, "--db", good_db)
        user_error(
            run,
            DATABASE_ERROR,
            f"database {good_db} is locked by another process",
            f"(PID {holder.pid})",
            "--db",
        )
    finally:
        watchdog.cancel()
        holder.kill()
        holder.wait(timeout=30)
    assert db_snapshot(good_db) == before


def test_database_that_is_not_duckdb(
    tmp_path: Path, ml1m_zip: Path, preprocess_cli: Preprocess, user_error: UserError
) -> None:
    db = write(tmp_path / "notes.duckdb", "not a database\n")
    user_error(
        preprocess_cli("--source", ml1m_zip, "--db", db),
        DATABASE_ERROR,
        f"database {db} could not be opened",
    )
    assert db.read_text() == "not a database\n"


def test_failure_on_a_new_database_leaves_no_file(
    tmp_path: Path, preprocess_cli: Preprocess, user_error: UserError
) -> None:
    source = write(tmp_path / "r.csv", "user_id,item_id,rating,timestamp\n1,2,x,4\n")
    db = tmp_path / "new.duckdb"
    user_error(
        preprocess_cli("--dataset", "csv", "--source", source, "--db", db),
        INPUT_ERROR,
        "line 2, column rating",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]
