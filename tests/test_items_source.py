"""`preprocess --items-source`: item metadata from CSV or Parquet into `items` (and every
row into `item_metadata`), kept and refreshed by `--append`, bad files refused with one
line and the database left byte for byte as it was. Real CLI calls, real DuckDB files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pytest
from conftest import Run, assert_user_error, cli, ok, rows, snapshot

import mfbatch.store.db

# Ratings with text ids: "007" and "7" are two items, as the interactions' ids always are.
RATINGS = (
    "user,item,stars,when\n"
    "u1,007,5,1000\n"
    "u1,b,3,1001\n"
    "u2,007,4,1002\n"
    "u2,7,2,1003\n"
    "u3,b,5,1004\n"
    "u3,7,1,1005\n"
    "u3,d,4,1006\n"
)
READ = ["--dataset", "csv", "--user-col", "user", "--item-col", "item"]
READ += ["--rating-col", "stars", "--time-col", "when", "--split", "random"]
# The id column is `item`, the ratings' --item-col, so no --items-id-col is needed. z is
# rated by nobody (kept aside); d has no row (NULL attributes).
METADATA = (
    "item,title,year,kids,Genres\n"
    "007,Bond,1962,false,Action\n"
    "b,Bee,1990,true,\n"
    "7,Seven,,true,Drama\n"
    "z,Zed,2020,false,Horror\n"
)


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return path


def _preprocess(db: Path, folder: Path, *extra: str | Path) -> Run:
    source = _write(folder / "ratings.csv", RATINGS)
    return cli("preprocess", *READ, "--source", source, "--db", db, *extra)


def _items(db: Path) -> dict[str, dict[str, Any]]:
    with_names = rows(db, "SELECT * FROM items ORDER BY item_idx")
    names = [r[0] for r in rows(db, "DESCRIBE items")]
    return {row[1]: dict(zip(names, row, strict=True)) for row in with_names}


def _digest(db: Path) -> str:
    assert not db.with_name(db.name + ".wal").exists()
    return hashlib.sha256(db.read_bytes()).hexdigest()


def test_a_csv_of_metadata_fills_items_and_keeps_unrated_rows_aside(tmp_path: Path) -> None:
    db = tmp_path / "mf.duckdb"
    meta = _write(tmp_path / "items.csv", METADATA)
    result = ok(_preprocess(db, tmp_path, "--items-source", meta))
    assert result.stdout.strip().endswith(
        f"; metadata from {meta}: 3 of 4 items described, 1 row for unrated items kept aside"
    )
    names = [r[0] for r in rows(db, "DESCRIBE items")]
    # items' own columns first (Genres in any case is the genres column), then the file's.
    assert names == [
        *("item_idx", "item_id", "title", "genres", "n_ratings", "n_train"),
        *("year", "kids"),
    ]
    items = _items(db)
    assert {i: (r["title"], r["genres"], r["year"], r["kids"]) for i, r in items.items()} == {
        "007": ("Bond", "Action", 1962, False),
        "7": ("Seven", "Drama", None, True),
        "b": ("Bee", None, 1990, True),
        "d": (None, None, None, None),  # rated, not described: NULL attributes
    }
    assert "z" not in items  # described, never rated: never in the catalogue
    stored = rows(db, "SELECT item_id, title, year FROM item_metadata ORDER BY item_id")
    assert stored == [("007", "Bond", 1962), ("7", "Seven", None), ("b", "Bee", 1990),
                      ("z", "Zed", 2020)]  # fmt: skip
    # The keys of items hold as before: the index is the key, a raw id appears once.
    constraints = rows(
        db,
        "SELECT constraint_type, constraint_column_names FROM duckdb_constraints() "
        "WHERE table_name = 'items' ORDER BY ALL",
    )
    assert ("PRIMARY KEY", ["item_idx"]) in constraints
    assert ("NOT NULL", ["item_id"]) in constraints
    duplicate = "INSERT INTO items BY NAME SELECT 99 AS item_idx, 'b' AS item_id, 0 AS n_ratings"
    with pytest.raises(duckdb.ConstraintException, match="item_id"), duckdb.connect(str(db)) as con:
        con.execute(duplicate + ", 0 AS n_train")
    # dataset_meta remembers the file and the id column it was read by.
    ((config,),) = rows(db, "SELECT config FROM dataset_meta")
    recorded = json.loads(config)["preprocess"]
    assert recorded["items_source"] == str(meta) and recorded["items_id_col"] == "item"


@pytest.mark.parametrize("newline", ["\r\n", "\r"], ids=["crlf", "lone-cr"])
def test_windows_and_old_mac_line_ends_read_like_lf(tmp_path: Path, newline: str) -> None:
    """The ratings reader relines a lone-CR file; the metadata reader does the same."""
    lf, other = tmp_path / "lf.duckdb", tmp_path / "other.duckdb"
    ok(_preprocess(lf, tmp_path, "--items-source", _write(tmp_path / "lf.csv", METADATA)))
    meta = _write(tmp_path / "other.csv", METADATA.replace("\n", newline).encode())
    ok(_preprocess(other, tmp_path, "--items-source", meta))
    assert _items(other) == _items(lf)
    assert _items(other)["7"]["title"] == "Seven"


def test_any_attribute_name_but_items_own(tmp_path: Path) -> None:
    """Spaces, quotes, a pandas index column and SQL words are column names like others."""
    db = tmp_path / "mf.duckdb"
    header = 'item,kid friendly,"say ""hi""",__index_level_0__,select,TITLE'
    meta = _write(tmp_path / "odd.csv", f"{header}\n007,true,x,0,1,Bond\nb,false,y,1,2,Bee\n")
    ok(_preprocess(db, tmp_path, "--items-source", meta))
    names = [r[0] for r in rows(db, "DESCRIBE items")][6:]
    assert names == ["kid friendly", 'say "hi"', "__index_level_0__", "select"]
    assert rows(db, "SELECT title, \"kid friendly\" FROM items WHERE item_id = 'b'") == [
        ("Bee", False)
    ]


def test_metadata_never_changes_the_dataset_identity(tmp_path: Path) -> None:
    """Models do not read metadata: a run trained before stays servable after it."""
    plain, described = tmp_path / "plain.duckdb", tmp_path / "described.duckdb"
    ok(_preprocess(plain, tmp_path))
    meta = _write(tmp_path / "items.csv", METADATA)
    ok(_preprocess(described, tmp_path, "--items-source", meta))
    sha = "SELECT dataset_sha256 FROM dataset_meta"
    assert rows(plain, sha) == rows(described, sha)
    assert rows(plain, "SELECT * FROM ratings ORDER BY ALL") == rows(
        described, "SELECT * FROM ratings ORDER BY ALL"
    )


def test_a_parquet_of_metadata_with_its_own_id_column(tmp_path: Path) -> None:
    """Integer ids in Parquet match the interactions' ids as their decimal text; the ratings
    come out of core here (--memory-mb), which writes the same items."""
    ratings = pl.DataFrame(
        {
            "user_id": [1, 1, 2, 2, 3, 3, 3],
            "item_id": [10, 20, 10, 30, 20, 30, 40],
            "rating": [5.0, 3.0, 4.0, 2.0, 5.0, 1.0, 4.0],
            "timestamp": list(range(1000, 1007)),
        }
    )
    ratings.write_parquet(tmp_path / "ratings.parquet")
    pl.DataFrame(
        {
            "sku": [10, 20, 30, 50],
            "title": ["Ten", "Twenty", "Thirty", "Fifty"],
            "price": [9.5, 20.0, None, 1.0],
            "tags": [["a"], ["b", "c"], [], ["d"]],
        }
    ).write_parquet(tmp_path / "catalogue.parquet")
    for extra in ([], ["--memory-mb", "512"]):
        db = tmp_path / f"mf{len(extra)}.duckdb"
        args = ["--source", tmp_path / "ratings.parquet", "--split", "random", *extra]
        args += ["--items-source", tmp_path / "catalogue.parquet", "--items-id-col", "sku"]
        ok(cli("preprocess", "--dataset", "parquet", *args, "--db", db))
        items = _items(db)
        assert {i: (r["title"], r["price"], r["tags"]) for i, r in items.items()} == {
            "10": ("Ten", 9.5, ["a"]),
            "20": ("Twenty", 20.0, ["b", "c"]),
            "30": ("Thirty", None, []),
            "40": (None, None, None),
        }
        assert rows(db, "SELECT count(*) FROM item_metadata") == [(4,)]


def test_metadata_titles_join_movielens_titles(ml100k_zip: Path, tmp_path: Path) -> None:
    """An item with a metadata row takes its title; the others keep the release's."""
    db = tmp_path / "ml.duckdb"
    meta = _write(tmp_path / "items.csv", "item_id,title,studio\n1,Toy Story (restored),Pixar\n")
    ok(cli("preprocess", "--dataset", "ml-100k", "--source", ml100k_zip, "--db", db,
           "--items-source", meta))  # fmt: skip
    got = rows(db, "SELECT item_id, title, studio FROM items ORDER BY item_idx")
    assert got[0] == ("1", "Toy Story (restored)", "Pixar")
    assert got[1] == ("2", "GoldenEye (1995)", None)


def test_a_re_preprocess_without_metadata_drops_it(tmp_path: Path) -> None:
    db = tmp_path / "mf.duckdb"
    ok(_preprocess(db, tmp_path, "--items-source", _write(tmp_path / "m.csv", METADATA)))
    ok(_preprocess(db, tmp_path))
    assert [r[0] for r in rows(db, "DESCRIBE items")][-1] == "n_train"
    assert "item_metadata" not in {t for (t,) in rows(db, "SHOW TABLES")}


APPENDED = "user,item,stars,when\nu4,z,5,2000\nu1,7,4,2001\nu5,q,3,2002\n"


def _append(db: Path, folder: Path, text: str, *extra: str | Path) -> Run:
    source = _write(folder / "day.csv", text)
    return cli("preprocess", "--append", "--source", source, "--db", db, *extra)


def test_append_fills_new_items_from_the_stored_metadata_and_updates_it(tmp_path: Path) -> None:
    db = tmp_path / "mf.duckdb"
    ok(_preprocess(db, tmp_path, "--items-source", _write(tmp_path / "items.csv", METADATA)))
    # No --items-source: z, described at preprocess, now rated, takes its stored row.
    ok(_append(db, tmp_path, APPENDED))
    items = _items(db)
    assert (items["z"]["title"], items["z"]["year"]) == ("Zed", 2020)
    assert items["q"]["title"] is None and items["b"]["year"] == 1990
    # A later file, read by the recorded id column (no flags): b's year changes, q gains a
    # row, a new column appears; columns it lacks keep their values; z's title stays.
    update = _write(tmp_path / "update.csv", "item,year,rating_band\nb,1991,PG\nq,2021,R\n")
    result = ok(_append(db, tmp_path, APPENDED, "--items-source", update))
    assert "appended no ratings from" in result.stdout  # the ratings were all stored
    assert f"metadata from {update}: 5 of 6 items described" in result.stdout
    items = _items(db)
    assert (items["b"]["title"], items["b"]["year"], items["b"]["rating_band"]) == (
        "Bee", 1991, "PG")  # fmt: skip
    assert (items["q"]["year"], items["q"]["rating_band"]) == (2021, "R")
    assert (items["z"]["title"], items["007"]["rating_band"]) == ("Zed", None)
    assert rows(db, "SELECT max(version) FROM dataset_versions") == [(1,)]  # no new version
    ((config,),) = rows(db, "SELECT config FROM dataset_meta")
    assert json.loads(config)["preprocess"]["items_source"] == str(update)
    # And a third append without a file keeps all of it.
    ok(_append(db, tmp_path, "user,item,stars,when\nu6,b,2,3000\n"))
    assert _items(db)["b"]["rating_band"] == "PG"


def test_append_metadata_with_new_ratings_in_one_version(tmp_path: Path) -> None:
    db = tmp_path / "mf.duckdb"
    ok(_preprocess(db, tmp_path))
    assert "item_metadata" not in {t for (t,) in rows(db, "SHOW TABLES")}
    meta = _write(tmp_path / "items.csv", METADATA)
    result = ok(_append(db, tmp_path, APPENDED, "--items-source", meta))
    assert "as version 1" in result.stdout and "4 of 6 items described" in result.stdout
    assert _items(db)["z"]["title"] == "Zed" and _items(db)["q"]["title"] is None


# --- Bad input: one line naming the file and the fix, exit 3, the database untouched -----


BAD = [
    ("no-id.csv", "sku,title\n007,Bond\n", ["no id column (item, item_id, id)", "--items-id-col"]),
    ("twice.csv", "item,title\n007,A\nb,B\n007,C\n", ["line 2 and line 4", "'007'", "one row"]),
    ("blank-id.csv", "item,title\n007,A\n,B\n", ["line 3, column item", "missing"]),
    ("clash.csv", "item,n_ratings\n007,5\n", ["'n_ratings'", "clashes", "rename"]),
    ("clash-id.csv", "item,ITEM_ID\n007,5\n", ["'ITEM_ID'", "clashes"]),
    ("case.csv", "item,Year,year\n007,1,2\n", ["'Year' and 'year'", "rename one"]),
    ("latin1.csv", b"item,title\n007,Mis\xe9rables\n", ["line 2", "0xE9", "UTF-8"]),
    ("empty.csv", "", ["empty"]),
    ("header.csv", "item,title\n", ["no rows"]),
    ("garbage.parquet", b"PAR1 not really", ["not a readable Parquet file"]),
    ("unnamed.csv", "item,,title\n007,1,A\n", ["column 2", "no name"]),
]


@pytest.mark.parametrize(("name", "content", "fragments"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_metadata_file_changes_nothing(
    tmp_path: Path, name: str, content: str | bytes, fragments: list[str]
) -> None:
    db = tmp_path / "mf.duckdb"
    ok(_preprocess(db, tmp_path, "--items-source", _write(tmp_path / "items.csv", METADATA)))
    before = _digest(db)
    bad = _write(tmp_path / name, content)
    for run in (
        _preprocess(db, tmp_path, "--items-source", bad),
        _append(db, tmp_path, APPENDED, "--items-source", bad),
    ):
        assert_user_error(run, 3, str(bad), *fragments)
        assert _digest(db) == before
    # A new database is not left behind either.
    fresh = tmp_path / "fresh.duckdb"
    assert_user_error(_preprocess(fresh, tmp_path, "--items-source", bad), 3, *fragments)
    assert not fresh.exists()


def test_a_missing_file_or_id_column_names_the_fix(tmp_path: Path) -> None:
    db = tmp_path / "mf.duckdb"
    ok(_preprocess(db, tmp_path))
    before = _digest(db)
    meta = _write(tmp_path / "items.csv", METADATA)
    gone = _preprocess(db, tmp_path, "--items-source", tmp_path / "nope.csv")
    assert_user_error(gone, 3, "--items-source", "nope.csv", "does not exist")
    wrong = _preprocess(db, tmp_path, "--items-source", meta, "--items-id-col", "product")
    assert_user_error(wrong, 3, "no column 'product'", "columns: item, title", "--items-id-col")
    alone = _preprocess(db, tmp_path, "--items-id-col", "item")
    assert_user_error(alone, 2, "--items-id-col", "only with --items-source")
    sep = _preprocess(db, tmp_path, "--items-source", meta, "--items-separator", "::")
    assert_user_error(sep, 2, "--items-separator", "single character")
    assert _digest(db) == before


def test_an_append_that_changes_a_column_type_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "mf.duckdb"
    ok(_preprocess(db, tmp_path, "--items-source", _write(tmp_path / "items.csv", METADATA)))
    before = _digest(db)
    words = _write(tmp_path / "words.csv", "item,year\nb,nineteen-ninety\n")
    refused = _append(db, tmp_path, APPENDED, "--items-source", words)
    fragments = ("column year", "holds text", "write it as whole numbers again")
    assert_user_error(refused, 3, str(words), *fragments)
    assert _digest(db) == before
    # Numbers may widen: a float year is taken.
    ok(_append(db, tmp_path, APPENDED, "--items-source",
               _write(tmp_path / "float.csv", "item,year\nb,1990.5\n")))  # fmt: skip
    assert _items(db)["b"]["year"] == 1990.5


def _state(db: Path) -> tuple[Any, ...]:
    return (
        snapshot(db),
        rows(db, "SELECT * FROM item_metadata ORDER BY item_id"),
        rows(db, "SELECT config FROM dataset_meta"),
        rows(db, "SELECT * FROM dataset_versions ORDER BY version"),
    )


@pytest.mark.parametrize(
    "step",
    [
        "append_insert_ratings",
        "create_described_items",
        "unique_item_ids",
        "create_item_metadata",
        "append_record_items_source",
    ],
)
def test_an_append_with_metadata_is_one_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """A failure at any write step of an append with metadata leaves every table as it was."""
    db = tmp_path / "mf.duckdb"
    ok(_preprocess(db, tmp_path, "--items-source", _write(tmp_path / "items.csv", METADATA)))
    update = _write(tmp_path / "update.csv", "item,year,band\nb,1991,PG\nq,2021,R\n")
    before = _state(db)
    real = mfbatch.store.db.run

    def failing(con: duckdb.DuckDBPyConnection, name: str, **params: Any) -> Any:
        if name == step:
            raise duckdb.IOException("disk full (injected)")
        return real(con, name, **params)

    monkeypatch.setattr(mfbatch.store.db, "run", failing)
    result = _append(db, tmp_path, APPENDED, "--items-source", update)
    monkeypatch.undo()
    assert_user_error(result, 4, "rolled back", "disk full (injected)")
    assert _state(db) == before
    ok(_append(db, tmp_path, APPENDED, "--items-source", update))
    assert _items(db)["q"]["band"] == "R"
