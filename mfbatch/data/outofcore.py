"""Preprocessing a Parquet source larger than memory (`preprocess --memory-mb N`).

The same result as `load_data` + `transforms.prepare`, table for table, without ever
holding every rating at once:

1. Checks and small aggregates (row count, rating range, id types, the time unit, the
   sorted distinct ids with each user's row count) come from Polars' streaming engine
   over a lazy scan; the values checked and the messages are `load_data`'s.
2. One streaming pass maps raw ids to dense ones and writes the ratings into buckets of
   whole users (Arrow IPC files under a work folder): contiguous ranges of user_idx sized
   from the memory budget. Each row carries its position in the source, so a bucket can
   be put back into file order, which decides which duplicate is kept.
3. Each bucket is deduplicated in memory with the very function the in-memory path uses;
   a bucket in user order is a slice of the in-memory path's sorted frame.
4. The split: `user-time` is per user, so per bucket. `time` needs one global cutoff,
   found by keeping only the newest n_val timestamps across buckets (or the oldest, when
   that is the smaller side), then ties at the cutoff go to the last (user, item) keys,
   assigned from the last bucket backwards. `random` draws the same NumPy permutation of
   positions as the in-memory path (8 bytes per rating, briefly) and cuts it by bucket.
5. Counts are summed over buckets, then each bucket's final rows are built by the shared
   `transforms.finish_ratings` and handed to the writer, one bucket at a time.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.ipc as ipc

from mfbatch.config import SplitConfig
from mfbatch.data.base import PrepStats
from mfbatch.data.generic import EARLIEST, EPOCH_UNITS, LATEST, OUTSIDE_YEARS, ParquetLoader
from mfbatch.data.transforms import (
    drop_duplicates,
    finish_ratings,
    id_tables,
    infer_scale,
    split_mask,
    val_count,
)
from mfbatch.errors import ConfigError, InputDataError, first_line

# Bytes of Python-side memory per rating while a bucket is deduplicated and written
# (5 columns read, a sorted copy, the dedup key and its argsort, the output columns);
# measured on the 25M-row benchmark, with headroom.
BYTES_PER_BUCKET_ROW = 240
# What the interpreter, Polars, DuckDB and the streaming pass hold besides the bucket.
RESERVED_MB = 384
# Rows per streamed chunk in the bucketing pass.
CHUNK_ROWS = 500_000
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
    }
    schema = numbered.collect_schema()
    roles = [r for r in ("user_id", "item_id", "rating", "ts") if r in schema]
    keep = ~pl.all_horizontal(pl.col(role).is_null() for role in roles)
    lazy = numbered.filter(keep)
    checked = [r for r in roles if not (r == "ts" and split.kind == "random")]
    first_row = {f"null_{r}": pl.col(ROW).filter(pl.col(r).is_null()).first() for r in checked}
    id_checks = {f"int_{r}": _integral(pl.col(r), schema[r]) for r in ("user_id", "item_id")}
    finite = pl.col("rating").is_finite()
    ts_checks: dict[str, pl.Expr] = {}
    if "ts" in schema and schema["ts"].is_numeric():
        ts_checks["ts_largest"] = pl.col("ts").abs().max()
        if schema["ts"].is_float():
            odd = ~pl.col("ts").is_finite() & pl.col("ts").is_not_null()
            ts_checks["ts_odd_row"] = pl.col(ROW).filter(odd).first()
            ts_checks["ts_odd"] = pl.col("ts").filter(odd).first()
    figures = _collect(
        lazy.select(
            rows=pl.len(),
            lo=pl.col("rating").min(),
            hi=pl.col("rating").max(),
            bad_row=pl.col(ROW).filter(~finite).first(),
            bad=pl.col("rating").filter(~finite).first(),
            **first_row,
            **{k: v for k, v in id_checks.items() if v is not None},
            **ts_checks,
        ),
        source,
    ).row(0, named=True)
    if figures["rows"] == 0:
        raise InputDataError(f"{source}: the file holds no rating rows")
    for role in checked:
        row = figures[f"null_{role}"]
        if row is not None:
            need = f"; --split {split.kind} needs a time on every rating" if role == "ts" else ""
            raise InputDataError(
                f"{source} row {row}, column {columns[role]}: value is missing{need}"
            )
    if figures["bad_row"] is not None:
        raise InputDataError(
            f"{source} row {figures['bad_row']}, column {columns['rating']}: "
            f"{figures['bad']} is not a finite number"
        )
    typed = {
        role: _as_id(pl.col(role), schema[role], figures.get(f"int_{role}"))
        for role in ("user_id", "item_id")
    }
    ts = pl.lit(None, dtype=pl.Datetime("us"))
    if "ts" in schema:
        ts = _as_timestamp(source, str(columns["ts"]), schema["ts"], figures)
        outside = (ts < EARLIEST) | (ts >= LATEST)
        found = _collect(
            lazy.select(
                row=pl.col(ROW).filter(outside).first(), value=pl.col("ts").filter(outside).first()
            ),
            source,
        ).row(0, named=True)
        if found["row"] is not None:
            raise InputDataError(
                f"{source} row {found['row']}, column {columns['ts']}: "
                f"{found['value']!r} {OUTSIDE_YEARS}"
            )
    return Scanned(
        numbered=numbered,
        keep=keep,
        typed=[
            typed["user_id"].alias("user_id"),
            typed["item_id"].alias("item_id"),
            pl.col("rating"),
            ts.alias("ts"),
            pl.col(ROW),
        ],
        source=source,
        rows_read=int(_collect(numbered.select(pl.len()), source).item()),
        rows_in=int(figures["rows"]),
        rating_seen=(figures["lo"], figures["hi"]),
        has_ts="ts" in schema,
    )


def _collect(query: pl.LazyFrame, source: Path) -> pl.DataFrame:
    try:
        return query.collect(engine="streaming")
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputDataError(
            f"{source}: the ratings could not be read ({first_line(exc)}); check that "
            "every part shares one schema"
        ) from None


def _integral(column: pl.Expr, dtype: pl.DataType) -> pl.Expr | None:
    """Whether every id is an integer (generic._as_id's test), for the types that ask."""
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


@dataclass
class Buckets:
    """The prepared dataset, its ratings still on disk in user-ordered buckets."""

    users: pl.DataFrame
    items: pl.DataFrame
    stats: PrepStats
    n_ratings: int
    parts: list[Path]
    masks: list[np.ndarray]  # np.packbits of each part's validation flags
    train_users: np.ndarray
    train_items: np.ndarray

    def ratings(self) -> Iterator[pl.DataFrame]:
        """Each bucket's `ratings` rows, in (user_idx, item_idx) order."""
        lo, hi = self.stats.rating_min, self.stats.rating_max
        for part, packed in zip(self.parts, self.masks, strict=True):
            frame = _read(part)
            is_val = np.unpackbits(packed, count=frame.height).view(bool)
            val_rows = np.flatnonzero(is_val)
            users = frame["user_idx"].to_numpy()[val_rows]
            items = frame["item_idx"].to_numpy()[val_rows]
            cold_user = np.zeros(frame.height, dtype=bool)
            cold_user[val_rows] = self.train_users[users] == 0
            cold_item = np.zeros(frame.height, dtype=bool)
            cold_item[val_rows] = self.train_items[items] == 0
            yield finish_ratings(frame, is_val, cold_user, cold_item, lo, hi)


def duckdb_mb(memory_mb: int) -> int:
    """DuckDB's memory_limit: its buffer pool would otherwise keep the appended blocks."""
    return max(64, memory_mb // 8)


def bucket_rows(memory_mb: int) -> int:
    """Ratings per bucket that keep one bucket's work inside the budget."""
    return max(100_000, (memory_mb - RESERVED_MB) * 2**20 // BYTES_PER_BUCKET_ROW)


def prepare(
    scanned: Scanned,
    *,
    split: SplitConfig,
    rating_scale: tuple[float, float] | None,
    work: Path,
    bucket_rows: int,
    log: Callable[[str], None] = lambda _: None,
) -> Buckets:
    """`transforms.prepare` in buckets of about `bucket_rows` ratings: the same tables."""
    origin = str(scanned.source)
    lo_seen, hi_seen = scanned.rating_seen
    lo, hi = infer_scale(
        pl.DataFrame({"rating": [lo_seen, hi_seen]}, schema={"rating": pl.Float64}),
        origin=origin,
        declared=rating_scale,
    )
    frame = scanned.frame
    per_user = _collect(frame.group_by("user_id").len().sort("user_id"), scanned.source)
    item_ids = _collect(frame.select(pl.col("item_id").unique().sort()), scanned.source)["item_id"]
    user_ids = per_user["user_id"]
    n_users, n_items = len(user_ids), len(item_ids)
    # Contiguous user ranges of about `bucket_rows` ratings each (one heavy user may exceed it).
    before = np.cumsum(per_user["len"].to_numpy(), dtype=np.int64) - per_user["len"].to_numpy()
    bucket = (before // bucket_rows).astype(np.int32)
    bucket = np.unique(bucket, return_inverse=True)[1].astype(np.int32)
    n_buckets = int(bucket[-1]) + 1
    del per_user, before

    log(f"bucketing {scanned.rows_in:,} ratings into {n_buckets} buckets of users")
    raw_parts = _write_buckets(scanned, user_ids, item_ids, bucket, n_buckets, work)
    del bucket

    log("deduplicating each bucket")
    parts: list[Path] = []
    sizes: list[int] = []
    dropped = 0
    n_user_ratings = np.zeros(n_users, dtype=np.int64)
    n_item_ratings = np.zeros(n_items, dtype=np.int64)
    for index, raw in enumerate(raw_parts):
        # Source order decides which duplicate is kept. The slices are appended in order
        # today; sorting by position keeps that true if the pass ever runs them in parallel.
        rows = _read(raw).sort(ROW).drop(ROW)
        raw.unlink()
        kept, gone = drop_duplicates(rows, n_items)
        del rows
        dropped += gone
        n_user_ratings += np.bincount(kept["user_idx"].to_numpy(), minlength=n_users)
        n_item_ratings += np.bincount(kept["item_idx"].to_numpy(), minlength=n_items)
        parts.append(_write(kept, work / f"dedup-{index:05d}.arrow"))
        sizes.append(kept.height)
    n = sum(sizes)

    if split.kind != "random" and not scanned.has_ts:
        raise InputDataError(
            f"{origin}: --split {split.kind} needs a timestamp on every rating but "
            f"{n:,} of {n:,} have none; pass --time-col or use --split random"
        )
    log(f"splitting {n:,} ratings ({split.kind})")
    masks, val_users, val_items, cutoff = _split(parts, sizes, split, n_users, n_items, origin)
    train_users = n_user_ratings - val_users
    train_items = n_item_ratings - val_items
    users, items = id_tables(
        user_ids, item_ids, n_user_ratings, train_users, n_item_ratings, train_items, None
    )
    n_val = int(val_users.sum())
    # A validation rating is cold when its user (item) has no training rating at all.
    cold_user = int(val_users[train_users == 0].sum())
    cold_item = int(val_items[train_items == 0].sum())
    stats = PrepStats(
        rows_in=scanned.rows_in,
        duplicates_dropped=dropped,
        rating_min=lo,
        rating_max=hi,
        n_train=n - n_val,
        n_val=n_val,
        n_val_cold_user=cold_user,
        n_val_cold_item=cold_item,
        time_cutoff=cutoff,
    )
    return Buckets(users, items, stats, n, parts, masks, train_users, train_items)


def _write_buckets(
    scanned: Scanned,
    user_ids: pl.Series,
    item_ids: pl.Series,
    bucket: np.ndarray,
    n_buckets: int,
    work: Path,
) -> list[Path]:
    """One streaming pass: raw ids -> dense ids, each row appended to its user's bucket."""
    users = pl.DataFrame(
        {
            "user_id": user_ids,
            "user_idx": pl.int_range(len(user_ids), dtype=pl.Int32, eager=True),
            "bucket": bucket,
        }
    )
    items = pl.DataFrame(
        {
            "item_id": item_ids,
            "item_idx": pl.int_range(len(item_ids), dtype=pl.Int32, eager=True),
        }
    )
    paths = [work / f"bucket-{b:05d}.arrow" for b in range(n_buckets)]
    writers: dict[int, ipc.RecordBatchFileWriter] = {}
    options = ipc.IpcWriteOptions(compression="lz4")
    try:
        # Slices of the source, each collected on its own: Polars' streaming engine ran
        # ahead of this loop (collect_batches held ~0.35 GB on the 25M benchmark).
        for start in range(0, scanned.rows_read, CHUNK_ROWS):
            chunk = (
                scanned.chunk(start, CHUNK_ROWS)
                .join(users.lazy(), on="user_id")
                .join(items.lazy(), on="item_id")
                .select("bucket", "user_idx", "item_idx", "rating", "ts", ROW)
                .collect()
            )
            for key, rows in chunk.partition_by("bucket", as_dict=True, include_key=False).items():
                index = int(key[0])
                table = rows.to_arrow()
                if index not in writers:
                    writers[index] = ipc.new_file(paths[index], table.schema, options=options)
                writers[index].write_table(table)
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputDataError(
            f"{scanned.source}: the ratings could not be read ({first_line(exc)})"
        ) from None
    finally:
        for writer in writers.values():
            writer.close()
    return paths


def _split(
    parts: list[Path],
    sizes: list[int],
    split: SplitConfig,
    n_users: int,
    n_items: int,
    origin: str,
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, datetime | None]:
    """Per bucket validation flags (packed), and validation counts per user and per item."""
    n = sum(sizes)
    n_val = val_count(n, split.val_fraction)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    decide: Callable[[int, pl.DataFrame], np.ndarray]
    if split.kind == "user-time":

        def decide(index: int, frame: pl.DataFrame) -> np.ndarray:
            return split_mask(frame, split, origin=origin)

    elif split.kind == "random":
        chosen = np.sort(np.random.default_rng(split.seed).choice(n, size=n_val, replace=False))
        cuts = np.searchsorted(chosen, offsets)

        def decide(index: int, frame: pl.DataFrame) -> np.ndarray:
            mask = np.zeros(frame.height, dtype=bool)
            mask[chosen[cuts[index] : cuts[index + 1]] - offsets[index]] = True
            return mask

    else:
        cutoff, ties_taken = _time_cutoff(parts, n, n_val)

        def decide(index: int, frame: pl.DataFrame) -> np.ndarray:
            ts = _epoch(frame)
            if n_val == 0:
                return np.zeros(len(ts), dtype=bool)
            mask = ts > cutoff
            tied = np.flatnonzero(ts == cutoff)
            take = ties_taken[index]
            if take:
                mask[tied[len(tied) - take :]] = True
            return mask

    masks: list[np.ndarray] = []
    val_users = np.zeros(n_users, dtype=np.int64)
    val_items = np.zeros(n_items, dtype=np.int64)
    first_val: datetime | None = None
    for index, part in enumerate(parts):
        frame = _read(part)
        mask = decide(index, frame)
        rows = np.flatnonzero(mask)
        val_users += np.bincount(frame["user_idx"].to_numpy()[rows], minlength=n_users)
        val_items += np.bincount(frame["item_idx"].to_numpy()[rows], minlength=n_items)
        if split.kind == "time" and len(rows):
            earliest = frame["ts"].gather(rows).min()
            if first_val is None or earliest < first_val:  # type: ignore[operator]
                first_val = earliest  # type: ignore[assignment]
        masks.append(np.packbits(mask))
    return masks, val_users, val_items, first_val


def _time_cutoff(parts: list[Path], n: int, n_val: int) -> tuple[int, list[int]]:
    """`split_mask`'s time cutoff over all buckets, and how many of each bucket's ratings
    tied at it go to validation (the last (user, item) keys overall, as in memory)."""
    if n_val == 0:
        return 0, [0] * len(parts)
    position = n - n_val  # of the cutoff in ascending order
    # Keep the smaller side: the n_val newest, or the position + 1 oldest.
    newest = n_val <= position + 1
    size = n_val if newest else position + 1
    kept = np.zeros(0, dtype=np.int64)
    for part in parts:
        both = np.concatenate([kept, _epoch(_read(part, ["ts"]))])
        if len(both) > size:
            both = (
                np.partition(both, len(both) - size)[len(both) - size :]
                if newest
                else np.partition(both, size - 1)[:size]
            )
        kept = both
    cutoff = int(kept.min() if newest else kept.max())
    del kept
    greater, tied = [], []
    for part in parts:
        ts = _epoch(_read(part, ["ts"]))
        greater.append(int((ts > cutoff).sum()))
        tied.append(int((ts == cutoff).sum()))
    need = n_val - sum(greater)
    taken = [0] * len(parts)
    for index in reversed(range(len(parts))):
        taken[index] = min(tied[index], need)
        need -= taken[index]
    return cutoff, taken


def _epoch(frame: pl.DataFrame) -> np.ndarray:
    return frame["ts"].dt.epoch("us").to_numpy()


def _write(frame: pl.DataFrame, path: Path) -> Path:
    frame.write_ipc(path, compression="lz4")
    return path


def _read(path: Path, columns: list[str] | None = None) -> pl.DataFrame:
    return pl.read_ipc(path, columns=columns)


def remove(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
