"""Bad input files, one test per kind: malformed lines, missing or misnamed columns, bad
values, empty files. Each is a non-zero exit, one `error:` line that names the file, line
and column at fault (no traceback), and the database exactly as it was before.

Every test runs against a copy of a prepared database (`good_db`, through `against`), so
"as it was" means the previous dataset is still there, row for row, with no stray table
beside it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import INPUT_ERROR, UserError, write

# --- malformed lines -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data", "expect"),
    [
        (
            "ml-1m/ratings.dat",
            b"1::1193::5::978300760\n1::661::3::978302109\n1::914::978301968\n",
            ["ratings.dat line 3", "expected 4 '::'-separated fields", "got 3"],
        ),
        (
            "ml-100k/u.data",
            b"1\t1\t5\t874965758\n1\t2\t3\t876893171\n2\t1\t4\t5\t888550871\n",
            ["u.data line 3", "got 5"],
        ),
        (
            "ml-latest-small/ratings.csv",
            b"userId,movieId,rating,timestamp\r\n1,1,4.0,964982703\r\n1,3,4.5\r\n",
            ["ratings.csv line 3", "got 3", "user_id, item_id, rating, ts"],
        ),
    ],
)
@pytest.mark.parametrize("packed", [True, False], ids=["zip", "folder"])
def test_movielens_line_with_wrong_field_count(
    name: str,
    data: bytes,
    expect: list[str],
    packed: bool,
    tmp_path: Path,
    layouts: Any,
    against: Callable[..., Any],
    user_error: UserError,
) -> None:
    if packed:
        source = layouts.write_zip(tmp_path / "release.zip", {name: data})
        expect = [*expect, f"release.zip:{name}"]
    else:
        source = layouts.write_tree(tmp_path / "x", {name: data})
    user_error(against("--source", source), INPUT_ERROR, *expect)


@pytest.mark.parametrize(
    ("line3", "got"),
    [("1,3,4,5,extra", "got 5"), ("1,3,4", "got 3")],
    ids=["too-many", "too-few"],
)
def test_csv_line_with_wrong_field_count(
    line3: str, got: str, tmp_path: Path, against: Callable[..., Any], user_error: UserError
) -> None:
    source = write(
        tmp_path / "r.csv", f"user_id,item_id,rating,timestamp\n1,2,3,4\n{line3}\n2,3,4,5\n"
    )
    user_error(
        against("--dataset", "csv", "--source", source),
        INPUT_ERROR,
        f"{source} line 3",
        "expected 4 ','-separated fields",
        got,
        line3,
    )


def test_movielens_id_that_is_not_an_integer(
    tmp_path: Path, layouts: Any, against: Callable[..., Any], user_error: UserError
) -> None:
    source = layouts.write_tree(
        tmp_path / "x", {"ml-1m/ratings.dat": b"1::1193::5::978300760\n2::x661::3::978302109\n"}
    )
    user_error(
        against("--source", source), INPUT_ERROR, "line 2, column item_id", "'x661' is not an"
    )


# --- columns -----------------------------------------------------------------------------------


def test_csv_misnamed_rating_column(
    tmp_path: Path, against: Callable[..., Any], user_error: UserError
) -> None:
    source = write(tmp_path / "r.csv", "user_id,item_id,stars,timestamp\n1,2,3,4\n2,2,4,5\n")
    user_error(
        against("--dataset", "csv", "--source", source, "--rating-col", "score"),
        INPUT_ERROR,
        str(source),
        "no column 'score'",
        "columns: user_id, item_id, stars, timestamp",
        "--rating-col",
    )


def test_csv_missing_user_column(
    tmp_path: Path, against: Callable[..., Any], user_error: UserError
) -> None:
    source = write(tmp_path / "r.csv", "customer,item_id,rating,timestamp\n1,2,3,4\n2,2,4,5\n")
    user_error(
        against("--dataset", "csv", "--source", source),
        INPUT_ERROR,
        str(source),
        "no column 'user_id'",
        "--user-col",
    )


def test_csv_with_the_wrong_separator(
    tmp_path: Path, against: Callable[..., Any], user_error: UserError
) -> None:
    source = write(tmp_path / "r.csv", "user_id;item_id;rating;timestamp\n1;2;3;4\n")
    user_error(
        against("--dataset", "csv", "--source", source), INPUT_ERROR, str(source), "--separator"
    )


def test_parquet_missing_column(
    tmp_path: Path, against: Callable[..., Any], user_error: UserError
) -> None:
    source = tmp_path / "r.parquet"
    pl.DataFrame({"user_id": [1, 2], "item": [1, 2], "rating": [1.0, 2.0]}).write_parquet(source)
    user_error(
        against("--dataset", "parquet", "--source", source, "--time-col", ""),
        INPUT_ERROR,
        str(source),
        "no column 'item_id'",
        "--item-col",
    )


# --- values ------------------------------------------------------------------------------------


def test_csv_non_numeric_rating(
    tmp_path: Path, against: Callable[..., Any], user_error: UserError
) -> None:
    source = write(tmp_path / "r.csv", "uid,iid,stars,ts\nu1,i1,3,4\nu1,i2,four,5\nu2,i1,2,6\n")
    flags = ("--user-col", "uid", "--item-col", "iid", "--rating-col", "stars", "--time-col", "ts")
    user_error(
        against("--dataset", "csv", "--source", source, *flags),
        INPUT_ERROR,
        f"{source} line 3, column stars",
        "'four' is not a number",
    )


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("ml-100k/u.data", b"1\t1\t5\t874965758\n1\t2\t3\t876893171\n2\t1\tfour\t888550871\n"),
        ("ml-1m/ratings.dat", b"1::1::5::978300760\n1::2::3::978302109\n2::1::four::978300761\n"),
        (
            "ml-latest/ratings.csv",
            b"userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,four,964981247\n",
        ),
    ],
)
def test_movielens_non_numeric_rating(
    name: str,
    data: bytes,
    tmp_path: Path,
    layouts: Any,
    against: Callable[..., Any],
    user_error: UserError,
) -> None:
    source = layouts.write_zip(tmp_path / "r.zip", {name: data})
    user_error(
        against("--source", source),
        INPUT_ERROR,
        f"r.zip:{name} line 3, column rating",
        "'four' is not a number",
    )


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_csv_rating_that_is_not_finite(
    value: str, tmp_path: Path, against: Callable[..., Any], user_error: UserError
) -> None:
    source = write(
        tmp_path / "r.csv", f"user_id,item_id,rating,timestamp\n1,2,3,4\n1,3,{value},5\n"
    )
    user_error(
        against("--dataset", "csv", "--source", source),
        INPUT_ERROR,
        f"{source} line 3, column rating",
        "not a finite number",
    )


def test_csv_missing_value(
    tmp_path: Path, against: Callable[..., Any], user_error: UserError
) -> None:
    source = write(tmp_path / "r.csv", "user_id,item_id,rating,timestamp\n1,2,3,4\n\n2,,4,5\n")
    # The blank line 3 is skipped but still counted.
    user_error(
        against("--dataset", "csv", "--source", source),
        INPUT_ERROR,
        f"{source} line 4, column item_id",
        "value is missing",
    )


def test_csv_timestamp_that_is_not_a_time(
    tmp_path: Path, against: Callable[..., Any], user_error: UserError
) -> None:
    source = write(
        tmp_path / "r.csv",
        "user_id,item_id,rating,when\n1,2,3,2021-01-01T00:00:00\n1,3,4,yesterday\n",
    )
    user_error(
        against("--dataset", "csv", "--source", source, "--time-col", "when"),
        INPUT_ERROR,
        f"{source} line 3, column when",
        "'yesterday' is not a timestamp",
    )


def test_movielens_rating_outside_the_release_scale(
    tmp_path: Path, layouts: Any, against: Callable[..., Any], user_error: UserError
) -> None:
    source = layouts.write_zip(
        tmp_path / "ml-1m.zip", {"ml-1m/ratings.dat": b"1::1::5::978300760\n1::2::7::978300761\n"}
    )
    user_error(
        against("--source", source),
        INPUT_ERROR,
        str(source),
        "[5.0, 7.0] outside the scale [1.0, 5.0]",  # brackets survive the console
        "--rating-min/--rating-max",
    )


# --- empty files -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dataset", "name", "data", "expect"),
    [
        ("csv", "r.csv", b"", "the file is empty"),
        ("csv", "r.csv", b"user_id,item_id,rating,timestamp\n", "holds no rating rows"),
        ("csv", "r.csv", b"user_id,item_id,rating,timestamp\n\n\n", "holds no rating rows"),
        ("ml-1m", "ml-1m/ratings.dat", b"", "the file is empty"),
        ("ml-1m", "ml-1m/ratings.dat", b"\n \n", "the file is empty"),
        ("ml-100k", "ml-100k/u.data", b"", "the file is empty"),
        (
            "ml-latest",
            "ml-latest/ratings.csv",
            b"userId,movieId,rating,timestamp\r\n",
            "has a header but no rating lines",
        ),
    ],
)
def test_empty_file(
    dataset: str,
    name: str,
    data: bytes,
    expect: str,
    tmp_path: Path,
    against: Callable[..., Any],
    user_error: UserError,
) -> None:
    source = write(tmp_path / name, data)
    user_error(against("--dataset", dataset, "--source", source), INPUT_ERROR, name, expect)


def test_parquet_without_rows(
    tmp_path: Path, against: Callable[..., Any], user_error: UserError
) -> None:
    source = tmp_path / "r.parquet"
    pl.DataFrame(
        schema={
            "user_id": pl.Int64,
            "item_id": pl.Int64,
            "rating": pl.Float64,
            "timestamp": pl.Int64,
        }
    ).write_parquet(source)
    user_error(
        against("--dataset", "parquet", "--source", source),
        INPUT_ERROR,
        str(source),
        "holds no rating rows",
    )
