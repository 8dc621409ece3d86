"""The preprocessing every loader shares: scale, ids, duplicates, split.

Kept as pure functions of frames (no files, no database) so the invariants (no row lost or
duplicated, ids a bijection, normalisation round-trips) are property-tested directly.
Work on row-sized arrays goes through NumPy / Polars expressions, never per-row Python.
"""

from __future__ import annotations

import math
from datetime import datetime

import numpy as np
import polars as pl

from mfbatch.config import SplitConfig
from mfbatch.data.frames import PreparedData, PrepStats, RawData
from mfbatch.errors import InputDataError

# The `split` column: one byte per row instead of a string per row (25M rows: 25 MB, not
# ~400 MB plus an Arrow copy); DuckDB casts it to the table's VARCHAR on insert.
SPLIT = pl.Enum(["train", "val"])


def infer_scale(
    ratings: pl.DataFrame, *, origin: str, declared: tuple[float, float] | None
) -> tuple[float, float]:
    """The [min, max] the ratings are normalised from: declared, else the observed range."""
    lo_seen, hi_seen = ratings.select(lo=pl.col("rating").min(), hi=pl.col("rating").max()).row(0)
    if declared is None:
        if not math.isfinite(float(hi_seen) - float(lo_seen)):
            raise InputDataError(
                f"{origin}: ratings span [{lo_seen}, {hi_seen}], too wide to scale to [0, 1] "
                "(max - min is not a finite number); check the rating column"
            )
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


def dense_ids(ids: pl.Series) -> tuple[pl.Series, pl.Series]:
    """(index per row, raw id per index): dense 0..n-1 in sorted order of the raw ids."""
    if ids.null_count() == 0 and len(ids):
        if ids.dtype.is_integer():
            fast = _dense_int_ids(ids)
            if fast is not None:
                return fast
        # A hash lookup of the sorted uniques; `rank("dense")` sorts every row instead
        # (5x slower on 25M integer ids, 20x on strings).
        uniques = ids.unique().sort()
        positions = pl.int_range(len(uniques), dtype=pl.Int32, eager=True)
        return ids.replace_strict(uniques, positions, return_dtype=pl.Int32), uniques
    index = (ids.rank("dense") - 1).cast(pl.Int32)
    return index, ids.unique().sort()


def map_ids(
    raw_ids: pl.Series, known: pl.DataFrame, key: str, offset: int
) -> tuple[pl.Series, pl.DataFrame]:
    """`preprocess --append`'s ids: (index per row, new ids as an idx/id frame). Ids in
    `known` keep their index; new ones follow `offset`, in the preprocess's order."""
    as_text = raw_ids.cast(pl.String)
    lookup = dict(zip(known[f"{key}_id"].to_list(), known[f"{key}_idx"].to_list(), strict=True))
    is_new = ~as_text.is_in(known[f"{key}_id"].implode())
    fresh = raw_ids.filter(is_new)
    index = as_text.replace_strict(
        list(lookup), list(lookup.values()), default=None, return_dtype=pl.Int32
    )
    if fresh.len() == 0:
        return index, pl.DataFrame(schema={f"{key}_idx": pl.Int32, f"{key}_id": pl.String})
    # New ids in sorted order of the raw id (numeric order for integer ids), after the last.
    fresh_idx, fresh_ids = dense_ids(fresh)
    index = index.scatter(np.flatnonzero(is_new.to_numpy()), fresh_idx + offset)
    new = pl.DataFrame(
        {
            f"{key}_idx": pl.int_range(offset, offset + len(fresh_ids), dtype=pl.Int32, eager=True),
            f"{key}_id": fresh_ids.cast(pl.String),
        }
    )
    return index, new


def _dense_int_ids(ids: pl.Series) -> tuple[pl.Series, pl.Series] | None:
    """Integer ids within a compact range: a lookup table over the range, no sort, no hash."""
    values = ids.to_numpy()
    lo, hi = int(values.min()), int(values.max())
    span = hi - lo + 1
    if span > max(2 * len(values), 1 << 20) or lo < -(2**62) or hi >= 2**62:
        return None
    offsets = values.astype(np.int64)  # a copy, shifted in place
    offsets -= lo
    present = np.zeros(span, dtype=bool)
    present[offsets] = True
    table = np.cumsum(present, dtype=np.int32)
    table -= 1
    index = pl.Series(ids.name, table[offsets], dtype=pl.Int32)
    uniques = pl.Series(ids.name, np.flatnonzero(present) + lo).cast(ids.dtype)
    return index, uniques


def drop_duplicates(
    frame: pl.DataFrame, n_items: int, *, implicit: bool = False
) -> tuple[pl.DataFrame, int]:
    """Keep the latest rating of each (user, item); ties keep the later line. Implicit
    feedback aggregates instead: a pair's rows are one interaction whose `weight` is
    their sum (counts add up) and whose time is the latest.

    Returns the frame sorted by (user_idx, item_idx), which later stages (CSR of rated
    items, per-user queries) read in that order.
    """
    key = frame["user_idx"].to_numpy().astype(np.int64)
    key *= n_items
    key += frame["item_idx"].to_numpy()
    if frame.height < 2 or bool((key[1:] > key[:-1]).all()):
        return frame, 0  # already sorted, so no key repeats
    # Stable argsort: NumPy's timsort runs in near-linear time on the common input that
    # is already grouped by user, and equal keys stay adjacent for the duplicate check.
    order = np.argsort(key, kind="stable")
    ordered = key[order]
    has_duplicates = bool((ordered[1:] == ordered[:-1]).any())
    del key, ordered
    if not has_duplicates:
        index = order.astype(np.uint32) if frame.height < 2**32 else order
        return frame[pl.Series(index)], 0
    del order
    frame = frame.with_columns(
        __key=pl.col("user_idx").cast(pl.Int64) * n_items + pl.col("item_idx")
    )
    # Stable sort: among equal (key, ts), file order decides, and the last one wins.
    ordered_frame = frame.sort(["__key", "ts"], maintain_order=True, nulls_last=False)
    is_last = pl.col("__key") != pl.col("__key").shift(-1, fill_value=-1)
    if implicit and "weight" in frame.columns:
        # The last row of each pair carries the pair's summed weight (and, sorted by
        # time, its latest time).
        ordered_frame = ordered_frame.with_columns(pl.col("weight").sum().over("__key"))
    kept = ordered_frame.filter(is_last)
    return kept.drop("__key"), frame.height - kept.height


def transform_weights(weight: pl.Expr, kind: str) -> pl.Expr:
    """The weight the loss uses from the weight as read (summed over implicit duplicates):
    `log1p` is log2(1 + w), so an interaction counted once weighs 1, twice 1.58, 1,000
    times ~10 (the damping of implicit ALS's 1 + alpha log(1 + r/eps)); `none` is w."""
    if kind == "none":
        return weight
    return (weight.log1p() / math.log(2.0)).alias("weight")


def split_mask(frame: pl.DataFrame, split: SplitConfig, *, origin: str) -> np.ndarray:
    """Boolean array, True for validation rows. `frame` is sorted by (user_idx, item_idx)."""
    n = frame.height
    if split.kind == "given":
        return frame["held_out"].to_numpy().astype(bool)
    if split.kind != "random":
        missing = frame["ts"].null_count()
        if missing:
            raise InputDataError(
                f"{origin}: --split {split.kind} needs a timestamp on every rating but "
                f"{missing:,} of {n:,} have none; pass --time-col or use --split random"
            )
    if split.kind == "random":
        n_val = val_count(n, split.val_fraction)
        mask = np.zeros(n, dtype=bool)
        mask[np.random.default_rng(split.seed).choice(n, size=n_val, replace=False)] = True
        return mask
    ts = frame["ts"].dt.epoch("us").to_numpy()
    if split.kind == "time":
        n_val = val_count(n, split.val_fraction)
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


def carve_inner(train: pl.DataFrame, fraction: float, seed: int) -> tuple[np.ndarray, str]:
    """A mask over `train`'s rows (sorted by user): the inner validation ratings.

    Per user, round(fraction * n_u) ratings, at least one left to train on: the newest
    when every rating has a time (like `preprocess --split user-time`), else a seeded random
    choice. Returns (mask, 'user-time' | 'random')."""
    users = train["user_idx"].to_numpy()
    n = users.size
    timed = train["ts_ms"].null_count() == 0
    # Newest first within each user (ties broken by item, so the carve is reproducible),
    # or a seeded random order when some rating has no time.
    key = -train["ts_ms"].to_numpy() if timed else np.random.default_rng(seed).random(n)
    order = np.lexsort((train["item_idx"].to_numpy(), key, users))
    u_sorted = users[order]
    rank = np.arange(n) - np.searchsorted(u_sorted, u_sorted, side="left")
    counts = np.bincount(users)[u_sorted]
    take = np.minimum(np.rint(fraction * counts).astype(np.int64), counts - 1)
    held = np.zeros(n, dtype=bool)
    held[order[rank < take]] = True
    return held, "user-time" if timed else "random"


# Inner validation shares (tune, tune_defaults) outside this range say more about a
# tiny or odd outer split than about the data: a search still needs rows on both sides.
INNER_SHARE = (0.05, 0.5)


def inner_share(n_val: int, n_rows: int, default: float = 0.2) -> float:
    """The share of rows the outer split holds out, within INNER_SHARE (`default` without
    one): an inner split carved at it looks like the split that is measured. Carved at 20%
    where ML-1M LCFN's given split holds out 11% a user, the inner split preferred a per-
    rating loss by +1.9% that the measured split then lost by 1.3% (docs/model.md)."""
    if n_val <= 0 or n_rows <= n_val:
        return default
    low, high = INNER_SHARE
    # Three decimals: what the log prints is what `--inner-fraction` takes to resume.
    return round(min(max(n_val / n_rows, low), high), 3)


def val_count(n: int, fraction: float) -> int:
    n_val = int(n * fraction + 0.5)
    # Always leave at least one training row, and give tiny sets one validation row.
    return max(min(n_val, n - 1), 1 if n >= 2 else 0)


# Implicit feedback is stored as rating 1 on the scale [0, 1]: every row a positive.
IMPLICIT_SCALE = (0.0, 1.0)


def prepare(
    raw: RawData,
    *,
    split: SplitConfig,
    rating_scale: tuple[float, float] | None,
    weight_transform: str = "none",
) -> PreparedData:
    ratings = raw.ratings
    rows_in = ratings.height
    if rows_in == 0:
        raise InputDataError(f"{raw.source}: no ratings found; check the file and --source")
    if raw.implicit:
        lo, hi = IMPLICIT_SCALE
    else:
        lo, hi = infer_scale(ratings, origin=raw.source, declared=rating_scale)

    user_idx, user_ids = dense_ids(ratings["user_id"])
    item_idx, item_ids = dense_ids(ratings["item_id"])
    columns = {
        "user_idx": user_idx,
        "item_idx": item_idx,
        "rating": ratings["rating"],
        "ts": ratings["ts"],
        "weight": ratings["weight"]
        if "weight" in ratings.columns
        else pl.Series("weight", [1.0] * rows_in, dtype=pl.Float64),
    }
    if "held_out" in ratings.columns:
        columns["held_out"] = ratings["held_out"]
    frame = pl.DataFrame(columns)
    del user_idx, item_idx, columns
    frame, dropped = drop_duplicates(frame, len(item_ids), implicit=raw.implicit)
    frame = frame.with_columns(transform_weights(pl.col("weight"), weight_transform))

    is_val = split_mask(frame, split, origin=raw.source)
    users_np = frame["user_idx"].to_numpy()
    items_np = frame["item_idx"].to_numpy()
    # Per-id counts over all rows, minus the validation rows: only the ~10% of val rows are
    # gathered, never the training rows.
    val_rows = np.flatnonzero(is_val)
    val_users, val_items = users_np[val_rows], items_np[val_rows]
    n_user_ratings = np.bincount(users_np, minlength=len(user_ids))
    n_item_ratings = np.bincount(items_np, minlength=len(item_ids))
    train_users = n_user_ratings - np.bincount(val_users, minlength=len(user_ids))
    train_items = n_item_ratings - np.bincount(val_items, minlength=len(item_ids))
    cold_user = np.zeros(frame.height, dtype=bool)
    cold_user[val_rows] = train_users[val_users] == 0
    cold_item = np.zeros(frame.height, dtype=bool)
    cold_item[val_rows] = train_items[val_items] == 0

    prepared = finish_ratings(frame, is_val, cold_user, cold_item, lo, hi)
    users, items = id_tables(
        user_ids, item_ids, n_user_ratings, train_users, n_item_ratings, train_items, raw.items
    )

    n_val = len(val_rows)
    cutoff: datetime | None = None
    if split.kind == "time" and n_val:
        cutoff = frame["ts"].gather(val_rows).min()  # type: ignore[assignment]
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
        implicit=raw.implicit,
    )
    return PreparedData(ratings=prepared, users=users, items=items, stats=stats)


def finish_ratings(
    frame: pl.DataFrame,
    is_val: np.ndarray,
    cold_user: np.ndarray,
    cold_item: np.ndarray,
    lo: float,
    hi: float,
) -> pl.DataFrame:
    """The `ratings` table's columns from deduplicated rows and their split flags (shared
    with the out-of-core path, mfbatch.data.outofcore, so both write the same types)."""
    split_labels = pl.Series("split", ["train", "val"], dtype=SPLIT)
    return frame.with_columns(
        rating_norm=normalise(pl.col("rating"), lo, hi),
        split=split_labels.gather(pl.Series(is_val.view(np.uint8))),
        cold_user=pl.Series(cold_user),
        cold_item=pl.Series(cold_item),
    ).select(
        "user_idx",
        "item_idx",
        "rating",
        "rating_norm",
        "ts",
        "split",
        "cold_user",
        "cold_item",
        pl.col("weight") if "weight" in frame.columns else pl.lit(1.0).alias("weight"),
    )


def id_tables(
    user_ids: pl.Series,
    item_ids: pl.Series,
    n_user_ratings: np.ndarray,
    train_users: np.ndarray,
    n_item_ratings: np.ndarray,
    train_items: np.ndarray,
    metadata: pl.DataFrame | None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The `users` and `items` tables: raw id per dense index, with rating counts."""
    users = pl.DataFrame(
        {
            "user_idx": pl.int_range(len(user_ids), dtype=pl.Int32, eager=True),
            "user_id": user_ids.cast(pl.String),
            "n_ratings": n_user_ratings.astype(np.int32),
            "n_train": train_users.astype(np.int32),
        }
    )
    items = pl.DataFrame(
        {
            "item_idx": pl.int_range(len(item_ids), dtype=pl.Int32, eager=True),
            "item_id": item_ids.cast(pl.String),
            "n_ratings": n_item_ratings.astype(np.int32),
            "n_train": train_items.astype(np.int32),
        }
    )
    meta = (
        metadata
        if metadata is not None
        else pl.DataFrame(schema={"item_id": pl.String, "title": pl.String, "genres": pl.String})
    )
    items = items.join(
        meta.select("item_id", "title", "genres").unique("item_id", keep="first"),
        on="item_id",
        how="left",
        maintain_order="left",
    ).select("item_idx", "item_id", "title", "genres", "n_ratings", "n_train")
    return users, items
