"""The lazy half of the out-of-core preprocess: a Parquet source checked and typed as
`load_data` does, without reading it into memory.

Every check is a streaming aggregate over the scan (null cells, non-finite ratings, which
ids are integers, the epoch unit, times outside 1900-2100), raising `load_data`'s own
message; the result is the typed lazy frame mfbatch.data.outofcore buckets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from mfbatch.config import SplitConfig
from mfbatch.data.generic import ParquetLoader
from mfbatch.data.tables import (
    EARLIEST,
    EPOCH_UNITS,
    GIVEN_HELD_OUT,
    GIVEN_TRAIN,
    LATEST,
    OUTSIDE_YEARS,
)
from mfbatch.errors import ConfigError, InputDataError, first_line

ROW = "__row"


@dataclass(frozen=True)
class Scanned:
    """The checked source and its figures; `frame` is the typed ratings (user_id, item_id,
    rating, ts, __row), `chunk` a slice of it by source row."""

    numbered: pl.LazyFrame  # the role columns as read, with __row
    keep: pl.Expr  # not a blank row
    typed: list[pl.Expr]
    source: Path
    rows_read: int  # blank rows included
    rows_in: int
    rating_seen: tuple[float, float]
    has_ts: bool
    implicit: bool = False  # no rating column: every row one positive (rating 1)

    @property
    def frame(self) -> pl.LazyFrame:
        return self.numbered.filter(self.keep).select(self.typed)

    def chunk(self, start: int, length: int) -> pl.LazyFrame:
        # Sliced before the filter, so each slice reads only its own rows.
        return self.numbered.slice(start, length).filter(self.keep).select(self.typed)


def scan(loader: ParquetLoader, split: SplitConfig) -> Scanned:
    """`load_data`'s checks and typing, each as a streaming aggregate over the source."""
    data = loader.data
    source, numbered = loader.scan(row_index=ROW)
    columns = {
        "user_id": data.user_col,
        "item_id": data.item_col,
        "rating": data.rating_col,
        "ts": data.time_col,
        "weight": data.weight_col,
        "split": split.split_col,
    }
    schema = numbered.collect_schema()
    roles = [r for r in ("user_id", "item_id", "rating", "ts", "weight", "split") if r in schema]
    keep = ~pl.all_horizontal(pl.col(role).is_null() for role in roles)
    lazy = numbered.filter(keep)
    checked = [r for r in roles if not (r == "ts" and split.kind in ("random", "given"))]
    figures = collect(lazy.select(**_aggregates(schema, checked)), source).row(0, named=True)
    _check_figures(figures, source, columns, checked, split)
    if "split" in schema:
        _check_given(lazy, source, str(columns["split"]))
    typed = {
        role: _as_id(pl.col(role), schema[role], figures.get(f"int_{role}"))
        for role in ("user_id", "item_id")
    }
    ts = pl.lit(None, dtype=pl.Datetime("us"))
    if "ts" in schema:
        ts = _checked_timestamp(lazy, source, str(columns["ts"]), schema["ts"], figures)
    one = pl.lit(1.0, dtype=pl.Float64)
    extra = [(pl.col("split") != GIVEN_TRAIN).alias("held_out")] if "split" in schema else []
    return Scanned(
        numbered=numbered,
        keep=keep,
        typed=[
            typed["user_id"].alias("user_id"),
            typed["item_id"].alias("item_id"),
            (pl.col("rating") if "rating" in schema else one).alias("rating"),
            ts.alias("ts"),
            (pl.col("weight") if "weight" in schema else one).alias("weight"),
            *extra,
            pl.col(ROW),
        ],
        source=source,
        rows_read=int(collect(numbered.select(pl.len()), source).item()),
        rows_in=int(figures["rows"]),
        rating_seen=(figures.get("lo", 1.0), figures.get("hi", 1.0)),
        has_ts="ts" in schema,
        implicit="rating" not in schema,
    )


def _check_given(lazy: pl.LazyFrame, source: Path, column: str) -> None:
    """`load_data`'s refusals of a --split given column: a value other than train/test/val
    (naming its row), no train row, a pair in both train and test."""
    known = pl.col("split").is_in([GIVEN_TRAIN, *GIVEN_HELD_OUT])
    found = collect(
        lazy.select(
            row=pl.col(ROW).filter(~known).first(),
            value=pl.col("split").filter(~known).first(),
            trains=(pl.col("split") == GIVEN_TRAIN).sum(),
        ),
        source,
    ).row(0, named=True)
    if found["row"] is not None:
        raise InputDataError(
            f"{source} row {found['row']}, column {column}: {found['value']!r} is not a "
            "split; --split given takes train or test (or val)"
        )
    if not found["trains"]:
        raise InputDataError(
            f"{source}: column {column} names no train row, so nothing could be trained "
            "on; check --split-col"
        )
    mixed = collect(
        lazy.group_by("user_id", "item_id")
        .agg(
            n=(pl.col("split") == GIVEN_TRAIN).n_unique(),
            first=pl.col(ROW).filter(pl.col("split") == GIVEN_TRAIN).min(),
            last=pl.col(ROW).filter(pl.col("split") != GIVEN_TRAIN).min(),
        )
        .filter(pl.col("n") > 1)
        .sort("first")
        .head(1),
        source,
    )
    if mixed.height:
        row = mixed.row(0, named=True)
        raise InputDataError(
            f"{source} row {row['first']} (train) and row {row['last']} (test): (user "
            f"{row['user_id']}, "
            f"item {row['item_id']}) is in both train and test; a pair can be held out or "
            "trained on, not both"
        )


def _aggregates(schema: pl.Schema, checked: list[str]) -> dict[str, pl.Expr]:
    """The one aggregate pass: row count, rating range, and the first row of each problem
    (`checked` roles missing, a non-finite rating or time), plus which ids are integers."""
    finite = pl.col("rating").is_finite()
    first_row = {f"null_{r}": pl.col(ROW).filter(pl.col(r).is_null()).first() for r in checked}
    id_checks = {f"int_{r}": _integral(pl.col(r), schema[r]) for r in ("user_id", "item_id")}
    ts_checks: dict[str, pl.Expr] = {}
    if "ts" in schema and schema["ts"].is_numeric():
        ts_checks["ts_largest"] = pl.col("ts").abs().max()
        if schema["ts"].is_float():
            odd = ~pl.col("ts").is_finite() & pl.col("ts").is_not_null()
            ts_checks["ts_odd_row"] = pl.col(ROW).filter(odd).first()
            ts_checks["ts_odd"] = pl.col("ts").filter(odd).first()
    rating: dict[str, pl.Expr] = {}
    if "rating" in schema:
        rating = {
            "lo": pl.col("rating").min(),
            "hi": pl.col("rating").max(),
            "bad_row": pl.col(ROW).filter(~finite).first(),
            "bad": pl.col("rating").filter(~finite).first(),
        }
    if "weight" in schema:
        odd_weight = ~pl.col("weight").is_finite() | (pl.col("weight") < 0)
        rating["weight_row"] = pl.col(ROW).filter(odd_weight).first()
        rating["weight_bad"] = pl.col("weight").filter(odd_weight).first()
    return {
        "rows": pl.len(),
        **rating,
        **first_row,
        **{k: v for k, v in id_checks.items() if v is not None},
        **ts_checks,
    }


def _check_figures(
    figures: dict[str, Any],
    source: Path,
    columns: dict[str, str | None],
    checked: list[str],
    split: SplitConfig,
) -> None:
    """`load_data`'s message for an empty source, a missing value or a non-finite rating."""
    if figures["rows"] == 0:
        raise InputDataError(f"{source}: the file holds no rating rows")
    for role in checked:
        row = figures[f"null_{role}"]
        if row is not None:
            need = f"; --split {split.kind} needs a time on every rating" if role == "ts" else ""
            raise InputDataError(
                f"{source} row {row}, column {columns[role]}: value is missing{need}"
            )
    if figures.get("bad_row") is not None:
        raise InputDataError(
            f"{source} row {figures['bad_row']}, column {columns['rating']}: "
            f"{figures['bad']} is not a finite number"
        )
    if figures.get("weight_row") is not None:
        raise InputDataError(
            f"{source} row {figures['weight_row']}, column {columns['weight']}: "
            f"{figures['weight_bad']!r} is not a weight (a finite number >= 0)"
        )


def _checked_timestamp(
    lazy: pl.LazyFrame, source: Path, column: str, dtype: pl.DataType, figures: dict[str, Any]
) -> pl.Expr:
    """The `ts` column as Datetime("us"), once no time falls outside 1900-2100."""
    ts = _as_timestamp(source, column, dtype, figures)
    outside = (ts < EARLIEST) | (ts >= LATEST)
    found = collect(
        lazy.select(
            row=pl.col(ROW).filter(outside).first(), value=pl.col("ts").filter(outside).first()
        ),
        source,
    ).row(0, named=True)
    if found["row"] is not None:
        raise InputDataError(
            f"{source} row {found['row']}, column {column}: {found['value']!r} {OUTSIDE_YEARS}"
        )
    return ts


def collect(query: pl.LazyFrame, source: Path) -> pl.DataFrame:
    try:
        return query.collect(engine="streaming")
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputDataError(
            f"{source}: the ratings could not be read ({first_line(exc)}); check that "
            "every part shares one schema"
        ) from None


def _integral(column: pl.Expr, dtype: pl.DataType) -> pl.Expr | None:
    """Whether every id is an integer (tables.as_id's test), for the types that ask."""
    if dtype.is_float():
        return (column == column.round()).all()
    if dtype == pl.String:
        as_int = column.cast(pl.Int64, strict=False)
        return (as_int.null_count() == column.null_count()) & (
            as_int.cast(pl.String) == column
        ).all()
    return None


def _as_id(column: pl.Expr, dtype: pl.DataType, integral: bool | None) -> pl.Expr:
    if dtype.is_integer() or integral:
        return column.cast(pl.Int64)
    return column.cast(pl.String)


def _as_timestamp(
    source: Path, column: str, dtype: pl.DataType, figures: dict[str, object]
) -> pl.Expr:
    ts = pl.col("ts")
    if dtype.is_numeric():
        if figures.get("ts_odd_row") is not None:
            raise InputDataError(
                f"{source} row {figures['ts_odd_row']}, column {column}: "
                f"{figures['ts_odd']!r} is not a Unix time"
            )
        largest = float(figures["ts_largest"] or 0)  # type: ignore[arg-type]
        unit = next(u for bound, u in EPOCH_UNITS if largest <= bound)
        return pl.from_epoch(ts.cast(pl.Int64), time_unit=unit).cast(pl.Datetime("us"))
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is not None:
            ts = ts.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
        return ts.cast(pl.Datetime("us"))
    if isinstance(dtype, pl.Date):
        return ts.cast(pl.Datetime("us"))
    # Polars infers a text format from the first value of what it is given: a chunk here,
    # the whole column in memory, so the two paths could read the same text differently.
    raise ConfigError(
        f"--memory-mb: {source} column {column} holds {dtype} times, which only the "
        "in-memory path parses; store them as a Parquet timestamp or Unix time, or drop "
        "--memory-mb"
    )
