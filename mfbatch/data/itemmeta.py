"""Item metadata (`preprocess --items-source FILE`): a CSV or Parquet file with one row per
item, an id column and any others, read into the frame the `items` table is joined with.

The id is matched as the text the interactions' ids are stored as (mfbatch.data.tables
`as_id`: a CSV id is its text, so "007" and "7" are two items; a Parquet integer is its
decimal spelling). `title` and `genres` fill the items columns of those names; every other
column is kept as an attribute that `score --where` / `--exclude-where` can name. Every
check runs before the database is written: a file that fails one changes nothing.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from mfbatch.data.tables import as_id
from mfbatch.errors import InputDataError, first_line

# The items table's own columns: an attribute may not take one of these names (title and
# genres are the exception: a file's title/genres columns fill them).
FIXED_COLUMNS = ("item_idx", "item_id", "title", "genres", "n_ratings", "n_train")
TEXT_COLUMNS = ("title", "genres")
PARQUET_SUFFIXES = (".parquet", ".pq")
FLAG = "--items-source"


@dataclass(frozen=True)
class ItemMetadata:
    """One metadata file as read: `frame` has `item_id` (text) first, then its columns."""

    frame: pl.DataFrame
    source: str
    id_col: str  # the file's id column, as found (recorded for the next --append)


def read_item_metadata(
    path: Path, *, id_col: str | None, guesses: tuple[str, ...], separator: str | None
) -> ItemMetadata:
    """Read and check `path`; `id_col` names the id column, else the first of `guesses`
    the file has. Raises InputDataError naming the file, line or column and the fix."""
    if path.is_dir() or not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise InputDataError(
            f"{FLAG}: {path} {what}; pass one CSV or Parquet file with an item id column"
        )
    parquet = path.suffix.lower() in PARQUET_SUFFIXES or _parquet_magic(path)
    table = _parquet(path) if parquet else _CsvFile.open(path, separator)
    header = table.columns if isinstance(table, pl.DataFrame) else table.header
    found = id_col or next((g for g in guesses if g in header), None)
    if found is None or found not in header:
        wanted = f"no column {id_col!r}" if id_col else f"no id column ({', '.join(guesses)})"
        raise InputDataError(
            f"{path}: {wanted} for the item id (columns: {_shown(header)}); pass "
            "--items-id-col with the one that holds the item ids"
        )
    _check_names(path, header, found)
    frame = table if isinstance(table, pl.DataFrame) else table.read(found)
    if frame.height == 0:
        raise InputDataError(f"{path}: no rows; put one row per item under the header")
    where = _row if parquet else _line
    frame = frame.with_row_index("__row")
    missing = frame.filter(pl.col(found).is_null())
    if missing.height:
        raise InputDataError(
            f"{path} {where(int(missing['__row'][0]))}, column {found}: the item id is "
            "missing; give every row an id (or drop the row)"
        )
    frame = frame.with_columns(as_id(frame[found]).cast(pl.String).alias(found))
    _check_unique(path, frame, found, where)
    # Title and Genres in any case are the items columns (DuckDB names ignore case).
    texts = {c: c.lower() for c in frame.columns if c != found and c.lower() in TEXT_COLUMNS}
    frame = frame.drop("__row").rename({found: "item_id", **texts})
    typed = [pl.col(c).cast(pl.String) for c in TEXT_COLUMNS if c in frame.columns]
    frame = frame.with_columns(typed).select("item_id", pl.exclude("item_id"))
    return ItemMetadata(frame, str(path), found)


def _parquet_magic(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == b"PAR1"


def _shown(header: list[str]) -> str:
    return ", ".join(header[:12]) + (", ..." if len(header) > 12 else "")


def _line(row: int) -> str:
    return f"line {row + 2}"  # 1-based, after the header line


def _row(row: int) -> str:
    return f"row {row}"


def _parquet(path: Path) -> pl.DataFrame:
    try:
        return pl.read_parquet(path, glob=False)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputDataError(
            f"{path}: not a readable Parquet file ({first_line(exc)}); pass a Parquet or "
            "CSV file of item metadata"
        ) from None


@dataclass(frozen=True)
class _CsvFile:
    """A CSV file's UTF-8 bytes and header, read once, typed once the id column is known."""

    path: Path
    data: bytes
    separator: str
    header: list[str]

    @classmethod
    def open(cls, path: Path, separator: str | None) -> _CsvFile:
        data = path.read_bytes()
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]  # a UTF-8 byte-order mark is not part of the first column's name
        if b"\r" in data and b"\n" not in data:
            # An old-Mac file (lone CRs): Polars splits lines on LF only and would read one
            # long header line. One CR for one LF: every line keeps its number.
            data = data.replace(b"\r", b"\n")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise InputDataError(
                f"{path} line {line}: byte 0x{data[exc.start]:02X} is not UTF-8; save the "
                "file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
            ) from None
        if not text.strip():
            raise InputDataError(
                f"{path}: the file is empty; put a header line and one row per item"
            )
        sep = separator or ("\t" if path.suffix.lower() in (".tsv", ".tab") else ",")
        header = next(csv.reader(io.StringIO(text), delimiter=sep), [])
        return cls(path, data, sep, header)

    def read(self, id_col: str) -> pl.DataFrame:
        """Every row, each column's type inferred from all of them (a catalogue is small,
        and `year > 1990` needs numbers); the id and title/genres as text. Columns take
        the header's names as CSV spells them (Polars keeps a quoted name's doubled quotes)."""
        try:
            named = pl.read_csv(io.BytesIO(self.data), separator=self.separator, n_rows=0)
            if len(named.columns) != len(self.header):
                raise ValueError(f"{len(named.columns)} columns, {len(self.header)} in the header")
            text = {
                polars: pl.String()
                for polars, name in zip(named.columns, self.header, strict=True)
                if name == id_col or name.lower() in TEXT_COLUMNS
            }
            frame = pl.read_csv(
                io.BytesIO(self.data),
                separator=self.separator,
                infer_schema_length=None,
                schema_overrides=text,
            )
        except (pl.exceptions.PolarsError, ValueError) as exc:
            raise InputDataError(
                f"{self.path}: not readable as {self.separator!r}-separated CSV "
                f"({first_line(exc)}); check --items-separator and quoting"
            ) from None
        return frame.rename(dict(zip(named.columns, self.header, strict=True)))


def _check_names(path: Path, header: list[str], id_col: str) -> None:
    """Every column named, none twice (DuckDB ignores case), none an items column."""
    seen: dict[str, str] = {}
    for at, name in enumerate(header, start=1):
        if not name.strip():
            raise InputDataError(
                f"{path}: column {at} of the header has no name; name it (or drop it)"
            )
        key = "item_id" if name == id_col else name.lower()
        if name != id_col and key in FIXED_COLUMNS and key not in TEXT_COLUMNS:
            raise InputDataError(
                f"{path}: column {name!r} clashes with the items table's own {key}; rename "
                f"it in the file (items keeps {', '.join(FIXED_COLUMNS)})"
            )
        if key in seen:
            raise InputDataError(
                f"{path}: columns {seen[key]!r} and {name!r} are one name to DuckDB (case "
                "is ignored); rename one of them"
            )
        seen[key] = name


def _check_unique(
    path: Path, frame: pl.DataFrame, id_col: str, where: Callable[[int], str]
) -> None:
    twice = frame.filter(pl.col(id_col).is_duplicated())
    if twice.height:
        first = twice.filter(pl.col(id_col) == twice[id_col][0])["__row"]
        raise InputDataError(
            f"{path} {where(int(first[0]))} and {where(int(first[1]))}, column {id_col}: "
            f"item {twice[id_col][0]!r} is described twice; keep one row per item"
        )


def merge(stored: pl.DataFrame | None, new: ItemMetadata) -> pl.DataFrame:
    """The stored metadata updated by a new file (`--append --items-source`): its rows
    replace the stored rows of the same ids in the columns it has (a null clears a value),
    add rows for new ids and add its new columns; the stored columns it lacks keep their
    values. A column whose type changed is refused (numbers may widen; a column with no
    value yet on either side takes the other's type)."""
    if stored is None:
        return new.frame
    fresh = new.frame
    for name, kind in fresh.schema.items():
        before = stored.schema.get(name)
        if name == "item_id" or before is None or before == kind:
            continue
        if stored[name].null_count() == stored.height:
            stored = stored.with_columns(pl.col(name).cast(kind))
        elif fresh[name].null_count() == fresh.height:
            fresh = fresh.with_columns(pl.col(name).cast(before))
        elif before.is_numeric() and kind.is_numeric():
            pair = [stored.select(name).head(0), fresh.select(name).head(0)]
            wider = pl.concat(pair, how="vertical_relaxed").schema[name]
            stored = stored.with_columns(pl.col(name).cast(wider))
            fresh = fresh.with_columns(pl.col(name).cast(wider))
        else:
            raise InputDataError(
                f"{new.source}: column {name} holds {_kind(kind)}, but the stored metadata "
                f"holds it as {_kind(before)}; write it as {_kind(before)} again, or re-run "
                "preprocess without --append to start the metadata afresh"
            )
    kept = stored.filter(~pl.col("item_id").is_in(fresh["item_id"].implode()))
    # The rows the file names, with the stored values of the columns it lacks.
    lacking = [c for c in stored.columns if c not in fresh.columns]
    updated = fresh.join(stored.select("item_id", *lacking), on="item_id", how="left")
    order = [*stored.columns, *(c for c in fresh.columns if c not in stored.columns)]
    return pl.concat([kept, updated.select(order)], how="diagonal").sort("item_id")


def _kind(dtype: pl.DataType) -> str:
    """A column type in a user's words."""
    if dtype.is_integer():
        return "whole numbers"
    if dtype.is_numeric():
        return "numbers"
    words = {pl.String: "text", pl.Boolean: "true/false"}
    return next((w for t, w in words.items() if dtype == t), str(dtype))


def storable(frame: pl.DataFrame) -> pl.DataFrame:
    """A column with no value at all (typed Null) stored as text: DuckDB needs a type."""
    return frame.with_columns(
        pl.col(c).cast(pl.String) for c, kind in frame.schema.items() if kind == pl.Null
    )


def with_metadata(items: pl.DataFrame, metadata: pl.DataFrame | None) -> pl.DataFrame:
    """The items table: its own columns, then the metadata's attributes. An item with a
    metadata row takes its title/genres where the metadata has such a column; an item
    without one keeps its own (MovieLens) and gets NULL attributes. Metadata rows for items
    not in `items` (never rated) stay out."""
    own = items.select(FIXED_COLUMNS)
    if metadata is None:
        return own
    attributes = [c for c in metadata.columns if c not in ("item_id", *TEXT_COLUMNS)]
    # No helper columns: an attribute may be called anything but items' own names.
    joined = own.join(
        metadata.select("item_id", *attributes), on="item_id", how="left", maintain_order="left"
    )
    described = own["item_id"].is_in(metadata["item_id"].implode())
    texts = [
        pl.when(described)
        .then(own["item_id"].replace_strict(metadata["item_id"], metadata[c], default=None))
        .otherwise(pl.col(c))
        .alias(c)
        for c in TEXT_COLUMNS
        if c in metadata.columns
    ]
    return joined.with_columns(texts).select(*FIXED_COLUMNS, *attributes)


def coverage(item_ids: pl.Series, metadata: pl.DataFrame) -> tuple[int, int]:
    """(catalogue items the metadata describes, metadata rows for items not in it)."""
    described = int(item_ids.cast(pl.String).is_in(metadata["item_id"].implode()).sum())
    return described, metadata.height - described
