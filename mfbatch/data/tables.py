"""What the CSV and Parquet loaders share: column roles, ids, timestamps, given splits.

The loaders themselves are in mfbatch.data.generic; out-of-core scans
(mfbatch.data.lazyscan) use the same rules for timestamps and split values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Literal

import polars as pl

from mfbatch.data.base import BaseDataLoader, RawData, sha256_file
from mfbatch.errors import InputDataError

ROLE_FLAGS = {
    "user_id": "--user-col",
    "item_id": "--item-col",
    "rating": "--rating-col",
    "ts": "--time-col",
    "weight": "--weight-col",
    "split": "--split-col",
}
# The --split given column's values: train, or held out (test; val is a synonym).
GIVEN_TRAIN = "train"
GIVEN_HELD_OUT = ("test", "val")


class TableLoader(BaseDataLoader):
    """Shared by CSV and Parquet: pick the columns, type them, check them."""

    # Parquet also takes a folder of parts (hive-partitioned or not).
    folders = False
    # Set by _check_present: the role -> column mapping the source was read with.
    roles: dict[str, str]

    def _source(self) -> Path:
        source = self.data.source
        if source is None:
            raise InputDataError(f"--source: --dataset {self.data.dataset} needs a file path")
        if self.folders and source.is_dir():
            if not any(source.rglob("*.parquet")):
                raise InputDataError(
                    f"--source: {source} is a folder with no .parquet files under it; pass a "
                    "Parquet file or a folder of parts"
                )
            return source
        if not source.is_file():
            raise InputDataError(f"--source: {source} does not exist or is not a file")
        return source

    def _columns(self, found: list[str]) -> dict[str, str]:
        """Role -> column name in the file. No rating column (--rating-col '', or the
        default name absent from the file) makes the source implicit feedback."""
        data = self.data
        roles = {"user_id": data.user_col, "item_id": data.item_col}
        rating = data.rating_col
        # Only the default name may be missing: a named --rating-col must be there.
        if rating is not None and (rating in found or "rating_col" in data._given):
            roles["rating"] = rating
        # The default time column may be absent where the split needs no time.
        needs_time = self.split.kind not in ("random", "given") or "time_col" in data._given
        if data.time_col and (data.time_col in found or needs_time):
            roles["ts"] = data.time_col
        if data.weight_col:
            roles["weight"] = data.weight_col
        if self.split.kind == "given" and self.split.split_col:
            roles["split"] = self.split.split_col
        return roles

    def _check_present(self, source: Path, found: list[str]) -> dict[str, str]:
        roles = self._columns(found)
        for role, column in roles.items():
            if column not in found:
                shown = ", ".join(found[:12]) + (", ..." if len(found) > 12 else "")
                if len(found) == 1 and self.name == "csv":
                    hint = f"only one column: check --separator ({self.data.separator!r} now)"
                elif role == "ts":
                    hint = "pass --time-col with one of them, or --time-col '' --split random"
                elif role == "rating":
                    hint = "pass --rating-col with one of them, or --rating-col '' (implicit)"
                else:
                    hint = f"pass {ROLE_FLAGS[role]} with one of them"
                raise InputDataError(
                    f"{source}: no column {column!r} for {role} (columns: {shown}); {hint}"
                )
        self.roles = roles
        return roles

    def _read(self, source: Path) -> pl.DataFrame:
        raise NotImplementedError

    def _where(self, row: int) -> str:
        """How messages point at the frame's `row` (0-based); CSV names the file line."""
        return f"row {row}"

    def _explain_missing(self, source: Path, row: int) -> str | None:
        """Why a value is missing at `row` (a short line), when the format can tell."""
        return None

    def load_data(self) -> RawData:
        source = self._source()
        frame = self._read(source).with_row_index("__row")
        roles = self.roles
        # A row with no user, item, rating (or time) is a blank line: it holds no rating.
        frame = frame.filter(~pl.all_horizontal(pl.col(role).is_null() for role in roles))
        if frame.height == 0:
            raise InputDataError(f"{source}: the file holds no rating rows")
        checked = [
            r for r in ("user_id", "item_id", "rating", "ts", "weight", "split") if r in roles
        ]
        if self.split.kind in ("random", "given"):
            checked = [r for r in checked if r != "ts"]  # these splits need no time
        for role in checked:
            nulls = frame.filter(pl.col(role).is_null())
            if nulls.height:
                need = f"; --split {self.split.kind} needs a time on every rating"
                need = need if role == "ts" else ""
                row = int(nulls["__row"][0])
                raise InputDataError(
                    self._explain_missing(source, row)
                    or f"{source} {self._where(row)}, column {roles[role]}: value is missing{need}"
                )
        frame = frame.with_columns(as_id(frame["user_id"]), as_id(frame["item_id"]))
        implicit = "rating" not in roles
        if implicit:
            frame = frame.with_columns(rating=pl.lit(1.0, dtype=pl.Float64))
        bad = frame.filter(~pl.col("rating").is_finite())
        if bad.height:
            raise InputDataError(
                f"{source} {self._where(int(bad['__row'][0]))}, column {roles['rating']}: "
                f"{bad['rating'][0]} is not a finite number"
            )
        frame = frame.with_columns(self._weights(frame, source))
        held_out = self._held_out(frame, source) if "split" in roles else None
        ts = (
            _as_timestamp(frame, source, roles["ts"], self._where)
            if "ts" in frame.columns
            else None
        )
        frame = frame.with_columns(
            ts if ts is not None else pl.lit(None, dtype=pl.Datetime("us")).alias("ts")
        )
        columns = ["user_id", "item_id", "rating", "ts", "weight"]
        if held_out is not None:
            frame = frame.with_columns(held_out)
            columns.append("held_out")
            given_conflicts(frame, source, self._where)
        return RawData(
            ratings=frame.select(columns),
            items=None,
            source=str(source),
            source_sha256=sha256_source(source),
            loader=self.name,
            layout=self.name,
            rating_scale=None,
            implicit=implicit,
        )

    def _weights(self, frame: pl.DataFrame, source: Path) -> pl.Series:
        """Each row's weight as read (1 without --weight-col): a finite number >= 0."""
        if "weight" not in frame.columns:
            return pl.Series("weight", [1.0] * frame.height, dtype=pl.Float64)
        weight = frame["weight"].cast(pl.Float64)
        bad = frame.filter(~weight.is_finite() | (weight < 0))
        if bad.height:
            raise InputDataError(
                f"{source} {self._where(int(bad['__row'][0]))}, column "
                f"{self.roles['weight']}: {bad['weight'][0]!r} is not a weight (a finite "
                "number >= 0)"
            )
        return weight.alias("weight")

    def _held_out(self, frame: pl.DataFrame, source: Path) -> pl.Series:
        """--split given: True where the split column says test (or val), False for train;
        any other value is refused, naming its row."""
        column = self.roles["split"]
        text = frame["split"].cast(pl.String)
        known = text.is_in([GIVEN_TRAIN, *GIVEN_HELD_OUT])
        if not known.all():
            at = int(known.arg_min() or 0)
            raise InputDataError(
                f"{source} {self._where(int(frame['__row'][at]))}, column {column}: "
                f"{text[at]!r} is not a split; --split given takes train or test (or val)"
            )
        train = text == GIVEN_TRAIN
        if not train.any():
            raise InputDataError(
                f"{source}: column {column} names no train row, so nothing could be trained "
                "on; check --split-col"
            )
        return (~train).alias("held_out")


def given_conflicts(frame: pl.DataFrame, source: Path, where: Callable[[int], str]) -> None:
    """Refuse a (user, item) that a given split puts in both train and test: it can be in
    one split only, and the held-out pair must not be trained on."""
    mixed = (
        frame.group_by("user_id", "item_id")
        .agg(n=pl.col("held_out").n_unique(), first=pl.col("__row").min())
        .filter(pl.col("n") > 1)
    )
    if mixed.height:
        row = mixed.sort("first").row(0, named=True)
        pair = frame.filter(
            (pl.col("user_id") == row["user_id"]) & (pl.col("item_id") == row["item_id"])
        )
        train = int(pair.filter(~pl.col("held_out"))["__row"][0])
        test = int(pair.filter(pl.col("held_out"))["__row"][0])
        raise InputDataError(
            f"{source} {where(train)} (train) and {where(test)} (test): (user "
            f"{row['user_id']}, item {row['item_id']}) is in both train and test; a pair "
            "can be held out or trained on, not both"
        )


def sha256_source(source: Path) -> str:
    """A file's checksum; for a folder of parts, one over each part's path and checksum."""
    if not source.is_dir():
        return sha256_file(source)
    digest = hashlib.sha256()
    for part in sorted(source.rglob("*.parquet")):
        digest.update(f"{part.relative_to(source).as_posix()}\0{sha256_file(part)}\n".encode())
    return digest.hexdigest()


def as_id(column: pl.Series) -> pl.Series:
    # Integer ids stay integers (numeric order); anything else is compared as text.
    if column.dtype.is_integer():
        return column.cast(pl.Int64)
    if column.dtype.is_float() and (column == column.round()).all():
        return column.cast(pl.Int64)
    if column.dtype == pl.String:
        # Text that is exactly an integer's spelling ("7", not "007" or "+7") is one.
        as_int = column.cast(pl.Int64, strict=False)
        if as_int.null_count() == column.null_count() and (as_int.cast(pl.String) == column).all():
            return as_int
    return column.cast(pl.String)


# Unix epochs are told apart by magnitude: seconds past 1e11 would be the year 5138, so a
# larger value is in ms, then us, then ns (1.7e18 ns is 2023). Anything that still lands
# outside these years is not a time a rating was made.
EPOCH_UNITS: tuple[tuple[float, Literal["s", "ms", "us", "ns"]], ...] = (
    (1e11, "s"),
    (1e14, "ms"),
    (1e17, "us"),
    (float("inf"), "ns"),
)
EARLIEST = datetime(1900, 1, 1)
LATEST = datetime(2100, 1, 1)
OUTSIDE_YEARS = (
    f"is outside {EARLIEST.year}-{LATEST.year} as a time; give Unix seconds, ms, us or ns, "
    "or an ISO date-time"
)


def _as_timestamp(
    frame: pl.DataFrame, source: Path, column: str, where: Callable[[int], str]
) -> pl.Series:
    ts = frame["ts"]

    def refuse(row: int, value: object, why: str) -> InputDataError:
        return InputDataError(f"{source} {where(row)}, column {column}: {value!r} {why}")

    if ts.dtype.is_numeric():
        if ts.dtype.is_float():
            odd = frame.filter(~ts.is_finite() & ts.is_not_null())
            if odd.height:
                raise refuse(int(odd["__row"][0]), odd["ts"][0], "is not a Unix time")
        largest = float(ts.abs().max() or 0)  # type: ignore[arg-type]
        unit = next(u for bound, u in EPOCH_UNITS if largest <= bound)
        parsed = pl.from_epoch(ts.cast(pl.Int64), time_unit=unit).cast(pl.Datetime("us"))
    elif isinstance(ts.dtype, pl.Datetime):
        if ts.dtype.time_zone is not None:
            ts = ts.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
        parsed = ts.cast(pl.Datetime("us"))
    elif isinstance(ts.dtype, pl.Date):
        parsed = ts.cast(pl.Datetime("us"))
    else:
        text = ts.cast(pl.String)
        if (word := first_word(frame, text)) is not None:
            raise refuse(
                *word,
                "is not a timestamp (expected Unix seconds/ms/us/ns or an ISO date-time)",
            )
        try:
            parsed = text.str.to_datetime(strict=False, time_unit="us")
        except pl.exceptions.PolarsError:
            # No date-time format fits the first value, so Polars can't even try the rest.
            first = frame.filter(ts.is_not_null())
            raise refuse(
                int(first["__row"][0]),
                first["ts"][0],
                "is not a timestamp (expected Unix seconds/ms/us/ns or an ISO date-time)",
            ) from None
        bad = frame.filter(parsed.is_null() & ts.is_not_null())
        if bad.height:
            raise refuse(
                int(bad["__row"][0]),
                bad["ts"][0],
                "is not a timestamp (expected Unix seconds/ms/us/ns or an ISO date-time)",
            )
        if isinstance(parsed.dtype, pl.Datetime) and parsed.dtype.time_zone is not None:
            parsed = parsed.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    outside = frame.filter((parsed < EARLIEST) | (parsed >= LATEST))
    if outside.height:
        raise refuse(
            int(outside["__row"][0]),
            outside["ts"][0],
            OUTSIDE_YEARS,
        )
    return parsed.alias("ts")


def first_word(frame: pl.DataFrame, text: pl.Series) -> tuple[int, str] | None:
    """The row of the first value that is not a number in a column whose first value is one:
    Unix times read as text because some later line holds a word (`yesterday`), which is
    the line to name, not the first one that the date-time parser then trips over."""
    numbers = text.str.strip_chars().cast(pl.Float64, strict=False)
    present = text.is_not_null()
    first = present.arg_true()
    if first.len() == 0 or numbers[int(first[0])] is None:
        return None
    words = frame.with_columns(text.alias("__text")).filter(present & numbers.is_null())
    return (int(words["__row"][0]), words["__text"][0]) if words.height else None


def numeric_casts(roles: dict[str, str]) -> list[pl.Expr]:
    """Rating and weight as Float64 (the split column as text), whatever the file stores."""
    cast = [pl.col(r).cast(pl.Float64) for r in ("rating", "weight") if r in roles]
    return cast + ([pl.col("split").cast(pl.String)] if "split" in roles else [])


def csv_types(roles: dict[str, str]) -> dict[str, pl.DataType]:
    # Ids as text: inferring integers would merge "007" and "7" into one id.
    types: dict[str, pl.DataType] = {
        roles["user_id"]: pl.String(),
        roles["item_id"]: pl.String(),
    }
    for role, dtype in (("rating", pl.Float64()), ("weight", pl.Float64()), ("split", pl.String())):
        if role in roles:
            types[roles[role]] = dtype
    return types
