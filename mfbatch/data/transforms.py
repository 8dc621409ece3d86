"""The preprocessing every loader shares: scale, ids, duplicates, split.

Kept as pure functions of frames (no files, no database) so the invariants (no row lost or
duplicated, ids a bijection, normalisation round-trips) are property-tested directly.
Work on row-sized arrays goes through NumPy / Polars expressions, never per-row Python.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import polars as pl

from mfbatch.config import SplitConfig
from mfbatch.data.base import PreparedData, PrepStats, RawData
from mfbatch.errors import InputDataError


def infer_scale(
    ratings: pl.DataFrame, *, origin: str, declared: tuple[float, float] | None
) -> tuple[float, float]:
    """The [min, max] the ratings are normalised from: declared, else the observed range."""
    lo_seen, hi_seen = ratings.select(lo=pl.col("rating").min(), hi=pl.col("rating").max()).row(0)
    if declared is None:
        if lo_seen == hi_seen:
            raise InputDataError(
                f"{origin}: every rating is {lo_seen}, so the rating scale can't be inferred; "
                "pass --rating-min and --rating-max"
            )
        return float(lo_seen), float(hi_seen)
    lo, hi = declared
    if lo_seen < lo or hi_seen > hi:
        raise InputDataError(
            f"{origin}: ratings span [{lo_seen}, {hi_seen}] outside the scale [{lo}, {hi}]; "
            "pass --rating-min/--rating-max that cover them"
        )
    return float(lo), float(hi)


def normalise(rating: pl.Expr, lo: float, hi: float) -> pl.Expr:
    return (rating - lo) / (hi - lo)


def denormalise(rating_norm: pl.Expr, lo: float, hi: float) -> pl.Expr:
    return rating_norm * (hi - lo) + lo


def dense_ids(ids: pl.Series) -> tuple[pl.Series, pl.Series]:
    """(index per row, raw id per index): dense 0..n-1 in sorted order of the raw ids."""
    index = (ids.rank("dense") - 1).cast(pl.Int32)
    return index, ids.unique().sort()


def drop_duplicates(frame: pl.DataFrame, n_items: int) -> tuple[pl.DataFrame, int]:
    """Keep the latest rating of each (user, item); ties keep the later line.

    Returns the frame sorted by (user_idx, item_idx), which later stages (CSR of rated
    items, per-user queries) read in that order.
    """
    key = pl.col("user_idx").cast(pl.Int64) * n_items + pl.col("item_idx")
    frame = frame.with_columns(__key=key)
    if frame["__key"].n_unique() == frame.height:
        return frame.sort("__key").drop("__key"), 0
    # Stable sort: among equal (key, ts), file order decides, and the last one wins.
    ordered = frame.sort(["__key", "ts"], maintain_order=True, nulls_last=False)
    kept = ordered.filter(pl.col("__key") != pl.col("__key").shift(-1, fill_value=-1))
    return kept.drop("__key"), frame.height - kept.height


def split_mask(frame: pl.DataFrame, split: SplitConfig, *, origin: str) -> np.ndarray:
    """Boolean array, True for validation rows. `frame` is sorted by (user_idx, item_idx)."""
    n = frame.height
    if split.kind != "random":
        missing = frame["ts"].null_count()
        if missing:
            raise InputDataError(
                f"{origin}: --split {split.kind} needs a timestamp on every rating but "
                f"{missing:,} of {n:,} have none; pass --time-col or use --split random"
            )
    if split.kind == "random":
        n_val = _val_count(n, split.val_fraction)
        mask = np.zeros(n, dtype=bool)
        mask[np.random.default_rng(split.seed).choice(n, size=n_val, replace=False)] = True
        return mask
    ts = frame["ts"].dt.epoch("us").to_numpy()
    if split.kind == "time":
        n_val = _val_count(n, split.val_fraction)
        if n_val == 0:
            return np.zeros(n, dtype=bool)
        cutoff = np.partition(ts, n - n_val)[n - n_val]
        mask = ts > cutoff
        # Ratings tied at the cutoff second: the largest (user, item) keys go to
        # validation, so the count is exact and the choice does not depend on file order.
        tied = np.flatnonzero(ts == cutoff)
        need = n_val - int(mask.sum())
        mask[tied[len(tied) - need :]] = True
        return mask
    # user-time: each user's newest round(fraction * n_u) ratings, keeping >= 1 in train.
    ranked = frame.select(
        newest=pl.col("ts").rank("ordinal", descending=True).over("user_idx"),
        n_u=pl.len().over("user_idx"),
    )
    n_u = ranked["n_u"].to_numpy()
    take = np.minimum(n_u - 1, np.floor(n_u * split.val_fraction + 0.5))
    return np.asarray(ranked["newest"].to_numpy() <= take)


def _val_count(n: int, fraction: float) -> int:
    n_val = int(n * fraction + 0.5)
    # Always leave at least one training row, and give tiny sets one validation row.
    return max(min(n_val, n - 1), 1 if n >= 2 else 0)


def prepare(
    raw: RawData, *, split: SplitConfig, rating_scale: tuple[float, float] | None
) -> PreparedData:
    ratings = raw.ratings
    rows_in = ratings.height
    if rows_in == 0:
        raise InputDataError(f"{raw.source}: no ratings found; check the file and --source")
    lo, hi = infer_scale(ratings, origin=raw.source, declared=rating_scale)

    user_idx, user_ids = dense_ids(ratings["user_id"])
    item_idx, item_ids = dense_ids(ratings["item_id"])
    frame = pl.DataFrame(
        {
            "user_idx": user_idx,
            "item_idx": item_idx,
            "rating": ratings["rating"],
            "ts": ratings["ts"],
        }
    )
    frame, dropped = drop_duplicates(frame, len(item_ids))

    is_val = split_mask(frame, split, origin=raw.source)
    users_np = frame["user_idx"].to_numpy()
    items_np = frame["item_idx"].to_numpy()
    train_users = np.bincount(users_np[~is_val], minlength=len(user_ids))
    train_items = np.bincount(items_np[~is_val], minlength=len(item_ids))
    cold_user = is_val & (train_users[users_np] == 0)
    cold_item = is_val & (train_items[items_np] == 0)

    val_series = pl.Series("is_val", is_val)
    prepared = frame.with_columns(
        rating_norm=normalise(pl.col("rating"), lo, hi),
        split=pl.when(val_series).then(pl.lit("val")).otherwise(pl.lit("train")),
        cold_user=pl.Series(cold_user),
        cold_item=pl.Series(cold_item),
    ).select(
        "user_idx", "item_idx", "rating", "rating_norm", "ts", "split", "cold_user", "cold_item"
    )

    users = pl.DataFrame(
        {
            "user_idx": pl.int_range(len(user_ids), dtype=pl.Int32, eager=True),
            "user_id": user_ids.cast(pl.String),
            "n_ratings": np.bincount(users_np, minlength=len(user_ids)).astype(np.int32),
            "n_train": train_users.astype(np.int32),
        }
    )
    items = pl.DataFrame(
        {
            "item_idx": pl.int_range(len(item_ids), dtype=pl.Int32, eager=True),
            "item_id": item_ids.cast(pl.String),
            "n_ratings": np.bincount(items_np, minlength=len(item_ids)).astype(np.int32),
            "n_train": train_items.astype(np.int32),
        }
    )
    meta = (
        raw.items
        if raw.items is not None
        else pl.DataFrame(schema={"item_id": pl.String, "title": pl.String, "genres": pl.String})
    )
    items = items.join(
        meta.select("item_id", "title", "genres").unique("item_id", keep="first"),
        on="item_id",
        how="left",
        maintain_order="left",
    ).select("item_idx", "item_id", "title", "genres", "n_ratings", "n_train")

    n_val = int(is_val.sum())
    cutoff: datetime | None = None
    if split.kind == "time" and n_val:
        cutoff = prepared.filter(pl.col("split") == "val")["ts"].min()  # type: ignore[assignment]
    stats = PrepStats(
        rows_in=rows_in,
        duplicates_dropped=dropped,
        rating_min=lo,
        rating_max=hi,
        n_train=prepared.height - n_val,
        n_val=n_val,
        n_val_cold_user=int(cold_user.sum()),
        n_val_cold_item=int(cold_item.sum()),
        time_cutoff=cutoff,
    )
    return PreparedData(ratings=prepared, users=users, items=items, stats=stats)
