"""Bad input that must be named by the line it is on, through the real CLI: a word among
Unix times (past the first line, and past the rows Polars samples for a column's type),
lone-CR line endings, a byte that is not UTF-8, and a source path that looks like a glob
pattern. Each refusal is one line, a non-zero exit, and the database that was there before
is byte for byte the same."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import INPUT_ERROR, assert_user_error, cli, ok, rows

HEADER = "user,item,rating,ts"


def lines(n: int, start: int = 0) -> list[str]:
    """`n` good rating lines: 7 users, 11 items, Unix seconds."""
    return [f"u{i % 7},i{i % 11},{1 + i % 5},{1_000_000 + i}" for i in range(start, start + n)]


def csv_args(source: Path, db: Path) -> list[str | Path]:
    return [
        "preprocess", "--db", db, "--dataset", "csv", "--source", source,
        "--user-col", "user", "--item-col", "item", "--time-col", "ts",
    ]  # fmt: skip


def prepared(tmp_path: Path) -> tuple[Path, bytes]:
    """A database prepared from a good file, and its bytes."""
    good = tmp_path / "good.csv"
    good.write_text("\n".join([HEADER, *lines(60)]) + "\n")
    db = tmp_path / "db.duckdb"
    ok(cli(*csv_args(good, db)))
    return db, db.read_bytes()


def refused(tmp_path: Path, source: Path, *fragments: str) -> str:
    """Preprocess `source` over a prepared database: refused naming every fragment, the
    database untouched."""
    db, before = prepared(tmp_path)
    message = assert_user_error(cli(*csv_args(source, db)), INPUT_ERROR, str(source), *fragments)
    assert db.read_bytes() == before
    return message


# --- a word among Unix times -----------------------------------------------------------------


def test_word_in_time_column_names_its_line(tmp_path: Path) -> None:
    source = tmp_path / "ratings.csv"
    source.write_text("\n".join([HEADER, *lines(50), "u1,i2,3,yesterday", *lines(5)]) + "\n")
    refused(tmp_path, source, "line 52, column ts", "'yesterday' is not a timestamp")


def test_word_in_time_column_past_the_sampled_rows(tmp_path: Path) -> None:
    # Polars types the column from the first 10,000 rows: the read itself fails.
    source = tmp_path / "ratings.csv"
    source.write_text("\n".join([HEADER, *lines(11_000), "u1,i2,3,yesterday", *lines(5)]) + "\n")
    refused(tmp_path, source, "line 11002, column ts", "'yesterday' is not a timestamp")


# --- lone-CR line endings (old Mac) ----------------------------------------------------------


def test_lone_cr_file_is_read_line_by_line(tmp_path: Path) -> None:
    source = tmp_path / "mac.csv"
    source.write_bytes(("\r".join([HEADER, *lines(50)]) + "\r").encode())
    db = tmp_path / "mac.duckdb"
    ok(cli(*csv_args(source, db)))
    assert rows(db, "SELECT count(*) FROM ratings") == [(50,)]
    assert rows(db, "SELECT count(*) FROM users") == [(7,)]


def test_lone_cr_file_names_the_line_of_a_bad_rating(tmp_path: Path) -> None:
    source = tmp_path / "mac.csv"
    text = "\r".join([HEADER, *lines(20), "u1,i2,x,1000000", *lines(5)]) + "\r"
    source.write_bytes(text.encode())
    refused(tmp_path, source, "line 22, column rating", "'x' is not a number")


def test_lone_cr_file_names_the_line_of_a_word_among_times(tmp_path: Path) -> None:
    source = tmp_path / "mac.csv"
    text = "\r".join([HEADER, *lines(30), "u1,i2,3,yesterday", *lines(5)]) + "\r"
    source.write_bytes(text.encode())
    refused(tmp_path, source, "line 32, column ts", "'yesterday' is not a timestamp")


def test_lone_cr_file_names_a_short_line(tmp_path: Path) -> None:
    source = tmp_path / "mac.csv"
    source.write_bytes(("\r".join([HEADER, *lines(8), "u1,i2,3", *lines(5)]) + "\r").encode())
    refused(tmp_path, source, "line 10", "expected 4", "got 3")


# --- bytes that are not UTF-8 ----------------------------------------------------------------


def test_latin1_byte_in_an_item_id_names_line_column_and_byte(tmp_path: Path) -> None:
    source = tmp_path / "ratings.csv"
    good = "\n".join([HEADER, *lines(40)]) + "\n"
    source.write_bytes(good.encode() + b"u3,caf\xe9,4,1000000\n" + "\n".join(lines(3)).encode())
    message = refused(tmp_path, source, "line 42, column item", "byte 0xE9", "'caf\\xe9'")
    assert "save the file as UTF-8" in message


def test_bad_byte_in_a_user_id_of_a_lone_cr_file(tmp_path: Path) -> None:
    source = tmp_path / "mac.csv"
    good = "\r".join([HEADER, *lines(12)]) + "\r"
    source.write_bytes(good.encode() + b"u\xff9,i1,3,1000000\r" + "\r".join(lines(3)).encode())
    refused(tmp_path, source, "line 14, column user", "byte 0xFF", "save the file as UTF-8")


# --- source paths that look like glob patterns -----------------------------------------------


def frame(n: int, start: int = 0) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user": [f"u{i % 7}" for i in range(start, start + n)],
            "item": [f"i{i % 11}" for i in range(start, start + n)],
            "rating": [float(1 + i % 5) for i in range(start, start + n)],
            "ts": [1_000_000 + i for i in range(start, start + n)],
        }
    )


def ratings_of(db: Path) -> int:
    return int(rows(db, "SELECT count(*) FROM ratings")[0][0])


@pytest.mark.parametrize("name", ["my[1].csv", "my*.csv", "my?.csv"])
def test_csv_path_with_glob_characters_is_that_file(name: str, tmp_path: Path) -> None:
    # `my1.csv` beside it would match the pattern: it must not be what is read.
    (tmp_path / "my1.csv").write_text("\n".join([HEADER, *lines(5)]) + "\n")
    source = tmp_path / name
    source.write_text("\n".join([HEADER, *lines(40)]) + "\n")
    db = tmp_path / "db.duckdb"
    ok(cli(*csv_args(source, db)))
    assert ratings_of(db) == 40


def test_csv_path_with_glob_characters_names_its_bad_line(tmp_path: Path) -> None:
    (tmp_path / "my1.csv").write_text("\n".join([HEADER, *lines(5)]) + "\n")
    source = tmp_path / "my[1].csv"
    source.write_text("\n".join([HEADER, *lines(20), "u1,i2,x,1000000"]) + "\n")
    refused(tmp_path, source, "line 22, column rating", "'x' is not a number")


def parquet_args(source: Path, db: Path, out_of_core: bool) -> list[str | Path]:
    extra = ["--memory-mb", "512"] if out_of_core else []
    return [
        "preprocess", "--db", db, "--dataset", "parquet", "--source", source,
        "--user-col", "user", "--item-col", "item", "--time-col", "ts", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("out_of_core", [False, True], ids=["memory", "memory-mb"])
def test_parquet_file_with_glob_characters_is_that_file(out_of_core: bool, tmp_path: Path) -> None:
    # The file the pattern would match has other columns: its schema must not be read either.
    frame(5).rename({"user": "u"}).write_parquet(tmp_path / "p1.parquet")
    frame(40).write_parquet(tmp_path / "p[1].parquet")
    db = tmp_path / "db.duckdb"
    ok(cli(*parquet_args(tmp_path / "p[1].parquet", db, out_of_core)))
    assert ratings_of(db) == 40


@pytest.mark.parametrize("out_of_core", [False, True], ids=["memory", "memory-mb"])
def test_parquet_folder_with_glob_characters_is_that_folder(
    out_of_core: bool, tmp_path: Path
) -> None:
    for folder, n in (("d1", 5), ("d[1]", 40)):
        for part in range(2):
            (tmp_path / folder / f"part={part}").mkdir(parents=True)
            frame(n // 2, start=part * n).write_parquet(
                tmp_path / folder / f"part={part}/x.parquet"
            )
    db = tmp_path / "db.duckdb"
    ok(cli(*parquet_args(tmp_path / "d[1]", db, out_of_core)))
    assert ratings_of(db) == 40


def test_parquet_folder_with_glob_characters_and_a_stray_file(tmp_path: Path) -> None:
    source = tmp_path / "d[1]"
    source.mkdir()
    frame(40).write_parquet(source / "x.parquet")
    (source / "notes.txt").write_text("not ratings\n")
    db, before = prepared(tmp_path)
    assert_user_error(
        cli(*parquet_args(source, db, False)),
        INPUT_ERROR,
        "notes.txt is not a .parquet part",
        "rename it",
    )
    assert db.read_bytes() == before


def test_out_of_core_database_in_a_folder_with_glob_characters(tmp_path: Path) -> None:
    # The work files are written beside the database: their paths hold the `[` too.
    frame(40).write_parquet(tmp_path / "ratings.parquet")
    (tmp_path / "runs[1]").mkdir()
    db = tmp_path / "runs[1]" / "db.duckdb"
    ok(cli(*parquet_args(tmp_path / "ratings.parquet", db, True)))
    assert ratings_of(db) == 40


def test_movielens_lone_cr_file_names_the_short_line(
    tmp_path: Path, layouts: Any, against: Callable[..., Any]
) -> None:
    data = b"userId,movieId,rating,timestamp\r1,1,4.0,964982703\r1,3,4.5,964981247\r1,6,4.0\r"
    source = layouts.write_tree(tmp_path / "x", {"ml-latest-small/ratings.csv": data})
    assert_user_error(against("--source", source), INPUT_ERROR, "ratings.csv line 4", "got 3")
