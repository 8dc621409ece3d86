"""The Python API's preprocess / append keywords: each goes to the config section that
declares it ([data] or [preprocess]: items_source=, memory_mb=, ...), item metadata given
as a file or a Polars / pandas / Arrow frame gives the items table the CLI gives, and an
unknown keyword is one line naming the close match. Real DuckDB files; the CLI is the
oracle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import cli, ok, rows
from test_items_source import METADATA, RATINGS, READ

import mfbatch
from mfbatch.errors import ConfigError, InputDataError
from mfbatch.stages.append import AppendSummary
from mfbatch.stages.append_items import RefreshSummary

# The CLI flags of READ as API keywords.
KEYWORDS: dict[str, Any] = {
    "dataset": "csv",
    "user_col": "user",
    "item_col": "item",
    "rating_col": "stars",
    "time_col": "when",
}
ITEMS = "SELECT * FROM items ORDER BY item_idx"
# The ratings as a frame, the way the CSV reads (text ids: "007" and "7" are two items).
FRAME = pl.read_csv(RATINGS.encode(), schema_overrides={"item": pl.String, "user": pl.String})


def _files(folder: Path) -> tuple[Path, Path]:
    ratings, items = folder / "ratings.csv", folder / "items.csv"
    ratings.write_text(RATINGS, encoding="utf-8")
    items.write_text(METADATA, encoding="utf-8")
    return ratings, items


def _by_cli(folder: Path, *extra: str | Path) -> Path:
    """The oracle: the same files through `mfbatch preprocess`."""
    ratings, items = _files(folder)
    db = folder / "cli.duckdb"
    ok(cli("preprocess", *READ, "--source", ratings, "--items-source", items, "--db", db, *extra))
    return db


def _items_of(db: Path) -> tuple[list[Any], list[tuple[Any, ...]]]:
    return [r[:2] for r in rows(db, "DESCRIBE items")], rows(db, ITEMS)


def test_items_source_as_a_keyword_gives_the_cli_items_table(tmp_path: Path) -> None:
    ratings, _ = _files(tmp_path)
    db = tmp_path / "api.duckdb"
    semi = tmp_path / "items-semi.csv"
    semi.write_text(METADATA.replace("item,", "sku,").replace(",", ";"), encoding="utf-8")
    summary = mfbatch.preprocess(db=db, source=ratings, split="random", items_source=semi,
                                 items_id_col="sku", items_separator=";", **KEYWORDS)  # fmt: skip
    assert (summary.items_source, summary.items_described, summary.items_unrated) == (
        str(semi), 3, 1)  # fmt: skip
    oracle = _by_cli(tmp_path, "--items-id-col", "item")
    assert _items_of(db) == _items_of(oracle)
    assert rows(db, "SELECT * FROM item_metadata ORDER BY item_id") == rows(
        oracle, "SELECT * FROM item_metadata ORDER BY item_id"
    )
    assert _items_of(db)[1][0][:3] == (0, "007", "Bond")  # the oracle is not empty
    # Any [preprocess] field: memory_mb reaches the stage, which refuses it for a CSV.
    with pytest.raises(ConfigError, match=r"^--memory-mb: only a Parquet source"):
        mfbatch.preprocess(db=tmp_path / "m.duckdb", source=ratings, memory_mb=512, **KEYWORDS)


@pytest.mark.parametrize("kind", ["polars", "pandas", "arrow"])
def test_frames_for_source_and_items_source(kind: str, tmp_path: Path) -> None:
    metadata = pl.read_csv(METADATA.encode(), schema_overrides={"item": pl.String})
    # numpy-backed pandas holds a whole number column with a gap as floats; its nullable
    # dtypes keep it whole, as the CSV reads it.
    convert = {"polars": lambda f: f, "pandas": lambda f: f.to_pandas().convert_dtypes(),
               "arrow": pl.DataFrame.to_arrow}[kind]  # fmt: skip
    db = tmp_path / "frames.duckdb"
    reading = {k: v for k, v in KEYWORDS.items() if k != "dataset"}  # a frame reads as Parquet
    summary = mfbatch.preprocess(db=db, source=convert(FRAME), items_source=convert(metadata),
                                 split="random", **reading)  # fmt: skip
    framed = f"items_source (a {kind} frame)"
    assert summary.items_source == framed and summary.source == f"source (a {kind} frame)"
    assert "mfbatch-frame-" not in summary.line()
    assert _items_of(db) == _items_of(_by_cli(tmp_path))
    # A metadata-only refresh from a frame: b's year, a new column.
    update = pl.DataFrame({"item": ["b"], "year": [1991], "band": ["PG"]})
    refreshed = mfbatch.append(db=db, items_source=convert(update))
    assert isinstance(refreshed, RefreshSummary)
    assert (refreshed.ids_updated, refreshed.columns_added) == (1, ("band",))
    assert refreshed.line().startswith(f"refreshed item metadata from {framed} (no ratings")
    assert rows(db, "SELECT title, year, band FROM items WHERE item_id = 'b'") == [
        ("Bee", 1991, "PG")
    ]


def test_append_takes_frames_and_files_alike(tmp_path: Path) -> None:
    day = "user,item,stars,when\nu4,z,5,2000\nu1,7,4,2001\n"
    (tmp_path / "day.csv").write_text(day, encoding="utf-8")
    by_file, by_frame = tmp_path / "file.duckdb", tmp_path / "frame.duckdb"
    ratings, items = _files(tmp_path)
    for db in (by_file, by_frame):
        mfbatch.preprocess(db=db, source=ratings, items_source=items, split="random", **KEYWORDS)
    mfbatch.append(db=by_file, source=tmp_path / "day.csv")
    frame = pl.read_csv(day.encode(), schema_overrides={"item": pl.String, "user": pl.String})
    summary = mfbatch.append(db=by_frame, source=frame)
    assert isinstance(summary, AppendSummary) and summary.new_items == 1
    assert summary.source == "source (a polars frame)"
    query = "SELECT u.user_id, i.item_id, i.title, r.rating, r.split FROM ratings r JOIN users " \
            "u USING (user_idx) JOIN items i USING (item_idx) ORDER BY ALL"  # fmt: skip
    assert rows(by_frame, query) == rows(by_file, query)
    assert ("u4", "z", "Zed", 5.0, "append") in rows(by_frame, query)


@pytest.mark.parametrize(
    ("call", "keywords", "message"),
    [
        ("preprocess", {"itemz_source": "x.csv"},
         "preprocess(itemz_source=...): unknown keyword; did you mean items_source=?"),
        ("append", {"items_sorce": "x.csv"},
         "append(items_sorce=...): unknown keyword; did you mean items_source=?"),
        ("preprocess", {"val_fraction": 0.2},
         "preprocess(val_fraction=...): a split setting; pass split={'val_fraction': ...}"),
        ("score", {"epochs": 3},
         "score(epochs=...): not one of score's keywords; did you mean mfbatch.train(epochs="),
        ("train", {"epoch": 3}, "train(epoch=...): unknown keyword; did you mean epochs=?"),
        ("preprocess", {"zzz": 1}, "preprocess(zzz=...): unknown keyword; known: cache_dir,"),
        ("append", {},
         "append: name new ratings with source=..., or item metadata to refresh with "
         "items_source=... (or both)"),
    ],
)  # fmt: skip
def test_a_wrong_keyword_is_one_line_naming_the_fix(
    call: str, keywords: dict[str, Any], message: str, tmp_path: Path
) -> None:
    db = tmp_path / "never.duckdb"
    with pytest.raises(ConfigError) as caught:
        getattr(mfbatch, call)(db=db, **keywords)
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value) and not db.exists()


def test_a_bad_metadata_frame_is_named_as_the_frame(tmp_path: Path) -> None:
    ratings, _ = _files(tmp_path)
    twice = pl.DataFrame({"item": ["b", "b"], "year": [1, 2]})
    with pytest.raises(InputDataError) as caught:
        mfbatch.preprocess(db=tmp_path / "x.duckdb", source=ratings, items_source=twice,
                           **KEYWORDS)  # fmt: skip
    assert str(caught.value).startswith(
        "items_source (a polars frame) row 0 and row 1, column item: item 'b' is described twice"
    ), str(caught.value)
    assert not (tmp_path / "x.duckdb").exists()
