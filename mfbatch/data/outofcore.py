"""Preprocessing a Parquet source larger than memory (`preprocess --memory-mb N`).

The same result as `load_data` + `transforms.prepare`, table for table, without ever
holding every rating at once:

1. mfbatch.data.lazyscan checks and types the source lazily; the small aggregates (the
   sorted distinct ids, each user's row count) come from Polars' streaming engine.
2. One pass over the source in slices of rows maps raw ids to dense ones and appends
   each row to its bucket (Arrow IPC files in a work folder): contiguous ranges of
   user_idx sized from the memory budget. Each row carries its position in the source,
   which decides which duplicate is kept.
3. Each bucket is deduplicated in memory with the very function the in-memory path uses;
   a bucket in user order is a slice of the in-memory path's sorted frame.
4. The split: `user-time` is per user, so per bucket. `time` needs one global cutoff,
   found by keeping only the newest n_val timestamps across buckets (or the oldest, when
   that is the smaller side: 8 bytes each, at most half the ratings), then ties at the
   cutoff go to the last (user, item) keys, assigned from the last bucket backwards.
   `random` draws the same NumPy permutation of positions as the in-memory path (8 bytes
   per rating, briefly) and cuts it by bucket.
5. Counts are summed over buckets, then each bucket's final rows are built by the shared
   `transforms.finish_ratings` and handed to the writer, one bucket at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.ipc as ipc

from mfbatch.config import SplitConfig
from mfbatch.data.base import PrepStats
from mfbatch.data.lazyscan import ROW, Scanned, collect
from mfbatch.data.transforms import (
    IMPLICIT_SCALE,
    drop_duplicates,
    finish_ratings,
    id_tables,
    infer_scale,
    split_mask,
    transform_weights,
    val_count,
)
from mfbatch.errors import InputDataError, first_line

# Bytes of Python-side memory per rating while a bucket is deduplicated and written
# (5 columns read, a sorted copy, the dedup key and its argsort, the output columns);
# measured on the 25M-row benchmark, with headroom.
BYTES_PER_BUCKET_ROW = 240
# What the interpreter, Polars, DuckDB and the streaming pass hold besides the bucket.
RESERVED_MB = 384
# Rows per streamed chunk in the bucketing pass.
CHUNK_ROWS = 500_000


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
    weight_transform: str = "none",
) -> Buckets:
    """`transforms.prepare` in buckets of about `bucket_rows` ratings: the same tables."""
    origin = str(scanned.source)
    lo_seen, hi_seen = scanned.rating_seen
    lo, hi = (
        IMPLICIT_SCALE
        if scanned.implicit
        else infer_scale(
            pl.DataFrame({"rating": [lo_seen, hi_seen]}, schema={"rating": pl.Float64}),
            origin=origin,
            declared=rating_scale,
        )
    )
    frame = scanned.frame
    per_user = collect(frame.group_by("user_id").len().sort("user_id"), scanned.source)
    item_ids = collect(frame.select(pl.col("item_id").unique().sort()), scanned.source)["item_id"]
    user_ids = per_user["user_id"]
    n_users, n_items = len(user_ids), len(item_ids)
    bucket = _user_buckets(per_user["len"].to_numpy(), bucket_rows)
    n_buckets = int(bucket[-1]) + 1
    del per_user

    log(f"bucketing {scanned.rows_in:,} ratings into {n_buckets} buckets of users")
    raw_parts = _write_buckets(scanned, user_ids, item_ids, bucket, n_buckets, work)
    del bucket

    log("deduplicating each bucket")
    deduped = _deduplicate(
        raw_parts, n_users, n_items, work, implicit=scanned.implicit, transform=weight_transform
    )
    n = sum(deduped.sizes)

    if split.kind not in ("random", "given") and not scanned.has_ts:
        raise InputDataError(
            f"{origin}: --split {split.kind} needs a timestamp on every rating but "
            f"{n:,} of {n:,} have none; pass --time-col or use --split random"
        )
    log(f"splitting {n:,} ratings ({split.kind})")
    masks, val_users, val_items, cutoff = _split(
        deduped.parts, deduped.sizes, split, n_users, n_items, origin
    )
    train_users = deduped.n_user_ratings - val_users
    train_items = deduped.n_item_ratings - val_items
    users, items = id_tables(
        user_ids,
        item_ids,
        deduped.n_user_ratings,
        train_users,
        deduped.n_item_ratings,
        train_items,
        None,
    )
    n_val = int(val_users.sum())
    # A validation rating is cold when its user (item) has no training rating at all.
    cold_user = int(val_users[train_users == 0].sum())
    cold_item = int(val_items[train_items == 0].sum())
    stats = PrepStats(
        rows_in=scanned.rows_in,
        duplicates_dropped=deduped.dropped,
        rating_min=lo,
        rating_max=hi,
        n_train=n - n_val,
        n_val=n_val,
        n_val_cold_user=cold_user,
        n_val_cold_item=cold_item,
        time_cutoff=cutoff,
        implicit=scanned.implicit,
    )
    return Buckets(users, items, stats, n, deduped.parts, masks, train_users, train_items)


def _user_buckets(per_user: np.ndarray, bucket_rows: int) -> np.ndarray:
    """Each user's bucket: contiguous user ranges of about `bucket_rows` ratings each (one
    heavy user may exceed it), numbered 0.. with none empty."""
    before = np.cumsum(per_user, dtype=np.int64) - per_user
    bucket = (before // bucket_rows).astype(np.int32)
    return np.unique(bucket, return_inverse=True)[1].astype(np.int32)


@dataclass
class _Deduplicated:
    parts: list[Path]
    sizes: list[int]
    dropped: int
    n_user_ratings: np.ndarray
    n_item_ratings: np.ndarray


def _deduplicate(
    raw_parts: list[Path],
    n_users: int,
    n_items: int,
    work: Path,
    *,
    implicit: bool,
    transform: str,
) -> _Deduplicated:
    """Each bucket deduplicated as the in-memory path does it, its raw file replaced by
    the kept rows; with the ratings counted per user and per item."""
    parts: list[Path] = []
    sizes: list[int] = []
    dropped = 0
    n_user_ratings = np.zeros(n_users, dtype=np.int64)
    n_item_ratings = np.zeros(n_items, dtype=np.int64)
    for index, raw in enumerate(raw_parts):
        # Source order decides which duplicate is kept, so the rows are put back in it
        # whatever order the bucketing pass appended its slices in.
        rows = _read(raw).sort(ROW).drop(ROW)
        raw.unlink()
        kept, gone = drop_duplicates(rows, n_items, implicit=implicit)
        kept = kept.with_columns(transform_weights(pl.col("weight"), transform))
        del rows
        dropped += gone
        n_user_ratings += np.bincount(kept["user_idx"].to_numpy(), minlength=n_users)
        n_item_ratings += np.bincount(kept["item_idx"].to_numpy(), minlength=n_items)
        parts.append(_write(kept, work / f"dedup-{index:05d}.arrow"))
        sizes.append(kept.height)
    return _Deduplicated(parts, sizes, dropped, n_user_ratings, n_item_ratings)


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
    given = ["held_out"] if "held_out" in scanned.frame.collect_schema() else []
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
                .select("bucket", "user_idx", "item_idx", "rating", "ts", "weight", *given, ROW)
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
    if split.kind in ("user-time", "given"):

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
    # glob=False: the work folder is beside the database, whose folder may be `runs[1]`.
    scan = pl.scan_ipc(path, glob=False)
    return (scan if columns is None else scan.select(columns)).collect()
