"""`preprocess --append --items-source FILE` without `--source`: a metadata-only refresh.
The stored metadata is updated as by an append with ratings, no dataset version is written,
the summary says what changed, and every refusal leaves the database byte for byte as it
was. Real CLI calls, real DuckDB files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import duckdb
import pytest
from conftest import Run, assert_user_error, cli, ok, rows
from test_items_source import METADATA, RATINGS, READ

import mfbatch.store.db

# What a refresh must leave alone: the ratings, ids and lineage.
UNTOUCHED = (
    "SELECT * FROM ratings ORDER BY ALL",
    "SELECT * FROM users ORDER BY ALL",
    "SELECT * FROM dataset_versions ORDER BY ALL",
    "SELECT dataset_sha256, n_users, n_items, n_ratings FROM dataset_meta",
    "SELECT item_idx, item_id, n_ratings, n_train FROM items ORDER BY item_idx",
)


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return path


def _prepared(folder: Path, *extra: str | Path) -> Path:
    db = folder / "mf.duckdb"
    source = _write(folder / "ratings.csv", RATINGS)
    ok(cli("preprocess", *READ, "--source", source, "--db", db, *extra))
    return db


def _refresh(db: Path, *extra: str | Path) -> Run:
    return cli("preprocess", "--append", "--db", db, *extra)


def _digest(db: Path) -> str:
    assert not db.with_name(db.name + ".wal").exists()
    return hashlib.sha256(db.read_bytes()).hexdigest()


def _items(db: Path) -> dict[str, dict[str, Any]]:
    names = [r[0] for r in rows(db, "DESCRIBE items")]
    return {r[1]: dict(zip(names, r, strict=True)) for r in rows(db, "SELECT * FROM items")}


def _untouched(db: Path) -> list[list[tuple[Any, ...]]]:
    return [rows(db, query) for query in UNTOUCHED]


def test_a_refresh_updates_the_metadata_and_nothing_else(tmp_path: Path) -> None:
    db = _prepared(tmp_path, "--items-source", _write(tmp_path / "items.csv", METADATA))
    before = _untouched(db)
    # b's year changes and it gains a band; d (rated, undescribed until now) is added; the
    # file has no title column, so titles stay.
    update = _write(tmp_path / "update.csv", "item,year,band\nb,1991,PG\nd,2001,R\n")
    result = ok(_refresh(db, "--items-source", update))
    line = result.stdout.strip()
    assert line.startswith(
        f"refreshed item metadata from {update} (no ratings read, dataset version 0 kept): "
        "2 rows, 1 ids updated, 1 new; columns added: band; now 4 of 4 items described "
        "(was 3) in "
    ), line
    assert line.endswith(f" -> {db}")
    items = _items(db)
    assert {i: (r["title"], r["year"], r["kids"], r["band"]) for i, r in items.items()} == {
        "007": ("Bond", 1962, False, None),
        "7": ("Seven", None, True, None),
        "b": ("Bee", 1991, True, "PG"),
        "d": (None, 2001, None, "R"),
    }
    # z (nobody rated it) keeps its stored row for a later append that brings it.
    assert rows(db, "SELECT year, band FROM item_metadata WHERE item_id = 'z'") == [(2020, None)]
    assert _untouched(db) == before  # no ratings, ids or version written
    recorded = json.loads(rows(db, "SELECT config FROM dataset_meta")[0][0])["preprocess"]
    assert (recorded["items_source"], recorded["items_id_col"]) == (str(update), "item")
    # The same file again changes nothing, and says so: not a byte written.
    digest = _digest(db)
    again = ok(_refresh(db, "--items-source", update)).stdout.strip()
    assert again.startswith(
        f"item metadata from {update}: all 2 rows already stored as they are, nothing "
        "changed (4 of 4 items described, dataset version 0) in "
    ), again
    assert _digest(db) == digest


def test_a_first_refresh_on_a_database_without_metadata(tmp_path: Path) -> None:
    db = _prepared(tmp_path)
    before = _untouched(db)
    meta = _write(tmp_path / "items.csv", METADATA)
    result = ok(_refresh(db, "--items-source", meta, "--json"))
    summary = json.loads(result.stdout)
    assert {k: summary[k] for k in ("rows_in", "ids_updated", "ids_new", "columns_added")} == {
        "rows_in": 4,
        "ids_updated": 0,
        "ids_new": 4,
        "columns_added": ["year", "kids"],  # title and genres fill items' own columns
    }
    assert (summary["items_described"], summary["items_described_before"]) == (3, 0)
    assert (summary["changed"], summary["version"]) == (True, 0)
    assert _items(db)["007"]["title"] == "Bond" and _items(db)["b"]["year"] == 1990
    assert _untouched(db) == before
    # A later append with ratings brings z and fills it from the stored row.
    day = _write(tmp_path / "day.csv", "user,item,stars,when\nu9,z,4,5000\n")
    ok(cli("preprocess", "--append", "--source", day, "--db", db))
    assert (_items(db)["z"]["title"], _items(db)["z"]["year"]) == ("Zed", 2020)


def test_every_refusal_leaves_the_database_byte_for_byte(tmp_path: Path) -> None:
    db = _prepared(tmp_path, "--items-source", _write(tmp_path / "items.csv", METADATA))
    digest = _digest(db)
    words = _write(tmp_path / "words.csv", "item,year\nb,nineteen-ninety\n")
    twice = _write(tmp_path / "twice.csv", "item,year\nb,1\nb,2\n")
    refusals = [
        (_refresh(db), 2, ["--append", "--source FILE", "--items-source FILE"]),
        (_refresh(db, "--items-source", words), 3, [str(words), "column year", "holds text"]),
        (_refresh(db, "--items-source", twice), 3, [str(twice), "line 2 and line 3"]),
        (_refresh(db, "--items-source", tmp_path / "gone.csv"), 3, ["gone.csv", "not exist"]),
        (
            _refresh(db, "--items-source", twice, "--items-id-col", "sku"),
            3,
            ["no column 'sku'", "--items-id-col"],
        ),
        (_refresh(db, "--items-source", words, "--split", "random"), 2, ["--split"]),
    ]
    for run, code, fragments in refusals:
        assert_user_error(run, code, *fragments)
        assert _digest(db) == digest
    missing = tmp_path / "none.duckdb"
    assert_user_error(_refresh(missing, "--items-source", words), 4, "does not exist")
    assert not missing.exists()


@pytest.mark.parametrize("step", ["create_described_items", "append_record_items_source"])
def test_a_refresh_is_one_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """A failure at a write step rolls back items, item_metadata and the recorded file."""
    db = _prepared(tmp_path, "--items-source", _write(tmp_path / "items.csv", METADATA))
    update = _write(tmp_path / "update.csv", "item,year,band\nb,1991,PG\n")
    state = ["SELECT * FROM items ORDER BY ALL", "SELECT * FROM item_metadata ORDER BY ALL",
             "SELECT config FROM dataset_meta"]  # fmt: skip
    before = [rows(db, query) for query in state]
    real = mfbatch.store.db.run

    def failing(con: duckdb.DuckDBPyConnection, name: str, **params: Any) -> Any:
        if name == step:
            raise duckdb.IOException("disk full (injected)")
        return real(con, name, **params)

    monkeypatch.setattr(mfbatch.store.db, "run", failing)
    result = _refresh(db, "--items-source", update)
    monkeypatch.undo()
    assert_user_error(result, 4, "rolled back", "disk full (injected)")
    assert [rows(db, query) for query in state] == before
    ok(_refresh(db, "--items-source", update))
    assert _items(db)["b"]["band"] == "PG"
