"""Property tests of the shared preprocessing (mfbatch.data.transforms).

Each property is checked against a plain-Python restatement of the rule on small random
rating sets with many duplicate pairs and tied timestamps, where the edge cases live.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mfbatch.config import SplitConfig
from mfbatch.data.base import RawData
from mfbatch.data.transforms import (
    dense_ids,
    infer_scale,
    normalise,
    prepare,
    split_mask,
)
from mfbatch.errors import InputDataError

SETTINGS = settings(max_examples=40, deadline=None)

Row = tuple[Any, Any, float, int | None]  # user_id, item_id, rating, ts (Unix seconds)

int_ids = st.integers(min_value=1, max_value=12)
str_ids = st.sampled_from(["a", "b", "B", "10", "9", "ä", "zz", "a b", "Zoë"])
stars = st.sampled_from([1.0, 1.5, 2.0, 3.0, 4.0, 4.5, 5.0])
times = st.integers(min_value=0, max_value=15)  # few distinct seconds: many ties


def rows_of(ids: st.SearchStrategy[Any], *, max_size: int = 60) -> st.SearchStrategy[list[Row]]:
    return st.lists(st.tuples(ids, ids, stars, times), min_size=1, max_size=max_size)


any_rows = st.one_of(rows_of(int_ids), rows_of(str_ids))
fractions = st.sampled_from([0.01, 0.1, 0.2, 0.25, 0.5, 0.75, 0.9, 0.99])
kinds = st.sampled_from(["time", "user-time", "random"])


def raw_of(rows: Sequence[Row]) -> RawData:
    ratings = pl.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "rating": [float(r[2]) for r in rows],
            "ts": pl.Series([r[3] for r in rows], dtype=pl.Int64),
        }
    ).with_columns(ts=pl.from_epoch("ts", time_unit="s"))
    return RawData(
        ratings=ratings,
        items=None,
        source="hypothesis.csv",
        source_sha256="0" * 64,
        loader="test",
        layout="test",
        rating_scale=None,
    )


def latest_per_pair(rows: Sequence[Row]) -> dict[tuple[str, str], tuple[float, int | None]]:
    """The rule, restated: per (user, item) the latest ts wins; on a tie the later line."""
    kept: dict[tuple[str, str], tuple[float, int | None]] = {}
    for user, item, rating, ts in rows:
        key = (str(user), str(item))
        if key not in kept or _not_before(ts, kept[key][1]):
            kept[key] = (rating, ts)
    return kept


def _not_before(ts: int | None, other: int | None) -> bool:
    if other is None:
        return True
    return ts is not None and ts >= other


def expected_val_count(n: int, fraction: float) -> int:
    """round(fraction * n), half up, leaving at least one train row and (n >= 2) one val row."""
    if n < 2:
        return 0
    return min(max(math.floor(n * fraction + 0.5), 1), n - 1)


def sort_key(ids: Sequence[Any]) -> list[Any]:
    """Numeric order for integer ids, else code-point (= UTF-8 byte) order."""
    return sorted(set(ids))


def joined(prepared: Any) -> pl.DataFrame:
    """Ratings with their raw ids mapped back through the users and items tables."""
    return prepared.ratings.join(prepared.users.select("user_idx", "user_id"), on="user_idx").join(
        prepared.items.select("item_idx", "item_id"), on="item_idx"
    )


def epoch(frame: pl.DataFrame) -> list[int]:
    return frame["ts"].dt.epoch("s").to_list()


# --- prepare: nothing lost, nothing doubled, ids a bijection --------------------------------


@SETTINGS
@given(rows=any_rows, kind=kinds, fraction=fractions, seed=st.integers(0, 3))
def test_prepare_keeps_each_pair_once_with_its_latest_rating(
    rows: list[Row], kind: str, fraction: float, seed: int
) -> None:
    split = SplitConfig(kind=kind, val_fraction=fraction, seed=seed)  # type: ignore[arg-type]
    prepared = prepare(raw_of(rows), split=split, rating_scale=(1.0, 5.0))
    expected = latest_per_pair(rows)

    frame = joined(prepared)
    got = {
        (u, i): (r, t)
        for u, i, r, t in zip(
            frame["user_id"], frame["item_id"], frame["rating"], epoch(frame), strict=True
        )
    }
    assert frame.height == prepared.ratings.height == len(got)  # each pair once
    assert got == expected  # no pair lost or invented; duplicates keep the latest
    stats = prepared.stats
    assert stats.rows_in == len(rows)
    assert stats.duplicates_dropped == len(rows) - len(expected)
    assert stats.n_train + stats.n_val == len(expected)
    assert (prepared.ratings["split"] == "val").sum() == stats.n_val
    assert set(prepared.ratings["split"]) <= {"train", "val"}


@SETTINGS
@given(
    rows=st.lists(
        st.tuples(int_ids, int_ids, stars, st.one_of(st.none(), times)), min_size=1, max_size=60
    ),
    seed=st.integers(0, 3),
)
def test_duplicates_without_timestamps_keep_the_later_line(rows: list[Row], seed: int) -> None:
    # A rating with a time beats one without; among equals the later line wins.
    split = SplitConfig(kind="random", val_fraction=0.3, seed=seed)
    prepared = prepare(raw_of(rows), split=split, rating_scale=(1.0, 5.0))
    frame = joined(prepared)
    got = {
        (u, i): (r, t)
        for u, i, r, t in zip(
            frame["user_id"],
            frame["item_id"],
            frame["rating"],
            frame["ts"].dt.epoch("s"),
            strict=True,
        )
    }
    assert len(got) == frame.height
    assert got == latest_per_pair(rows)


@SETTINGS
@given(rows=any_rows, kind=kinds)
def test_id_mapping_is_a_dense_sorted_bijection(rows: list[Row], kind: str) -> None:
    split = SplitConfig(kind=kind, val_fraction=0.2)  # type: ignore[arg-type]
    prepared = prepare(raw_of(rows), split=split, rating_scale=(1.0, 5.0))
    for table, column, position in (("users", "user", 0), ("items", "item", 1)):
        frame = getattr(prepared, table)
        raw_ids = [r[position] for r in rows]
        assert frame[f"{column}_idx"].to_list() == list(range(frame.height))
        assert frame[f"{column}_id"].n_unique() == frame.height
        # Sorted by the raw id (numerically for integer ids), as strings in the table.
        assert frame[f"{column}_id"].to_list() == [str(x) for x in sort_key(raw_ids)]
        # Every rating's index points at a row of the table.
        indices = prepared.ratings[f"{column}_idx"]
        assert indices.min() >= 0 and indices.max() < frame.height
        # Counts per id agree with the deduplicated ratings.
        n_ratings = Counter(indices.to_list())
        n_train = Counter(
            prepared.ratings.filter(pl.col("split") == "train")[f"{column}_idx"].to_list()
        )
        assert frame["n_ratings"].to_list() == [n_ratings[i] for i in range(frame.height)]
        assert frame["n_train"].to_list() == [n_train[i] for i in range(frame.height)]


@SETTINGS
@given(rows=any_rows, kind=kinds, fraction=fractions)
def test_cold_flags_mark_val_rows_unseen_in_train(
    rows: list[Row], kind: str, fraction: float
) -> None:
    split = SplitConfig(kind=kind, val_fraction=fraction)  # type: ignore[arg-type]
    prepared = prepare(raw_of(rows), split=split, rating_scale=(1.0, 5.0))
    r = prepared.ratings
    train = r.filter(pl.col("split") == "train")
    seen_users, seen_items = set(train["user_idx"]), set(train["item_idx"])
    for user, item, is_val, cold_user, cold_item in zip(
        r["user_idx"], r["item_idx"], r["split"] == "val", r["cold_user"], r["cold_item"],
        strict=True,
    ):  # fmt: skip
        assert cold_user == (is_val and user not in seen_users)
        assert cold_item == (is_val and item not in seen_items)
    assert prepared.stats.n_val_cold_user == r["cold_user"].sum()
    assert prepared.stats.n_val_cold_item == r["cold_item"].sum()


# --- the three splits -----------------------------------------------------------------------


@SETTINGS
@given(rows=any_rows, fraction=fractions)
def test_time_split_holds_out_the_newest(rows: list[Row], fraction: float) -> None:
    split = SplitConfig(kind="time", val_fraction=fraction)
    prepared = prepare(raw_of(rows), split=split, rating_scale=(1.0, 5.0))
    r = prepared.ratings
    val, train = r.filter(pl.col("split") == "val"), r.filter(pl.col("split") == "train")
    assert val.height == expected_val_count(r.height, fraction)
    assert train.height >= 1
    if val.height:
        assert max(epoch(train)) <= min(epoch(val))
        assert prepared.stats.time_cutoff == val["ts"].min()
    else:
        assert prepared.stats.time_cutoff is None


@SETTINGS
@given(data=st.data(), fraction=fractions)
def test_time_split_does_not_depend_on_file_order(data: st.DataObject, fraction: float) -> None:
    rows = data.draw(rows_of(int_ids))
    unique = list({(u, i): (u, i, r, t) for u, i, r, t in rows}.values())
    shuffled = data.draw(st.permutations(unique))
    split = SplitConfig(kind="time", val_fraction=fraction)
    a = prepare(raw_of(unique), split=split, rating_scale=(1.0, 5.0))
    b = prepare(raw_of(shuffled), split=split, rating_scale=(1.0, 5.0))
    assert a.ratings.equals(b.ratings)


@SETTINGS
@given(rows=any_rows, fraction=fractions)
def test_user_time_split_per_user(rows: list[Row], fraction: float) -> None:
    split = SplitConfig(kind="user-time", val_fraction=fraction)
    prepared = prepare(raw_of(rows), split=split, rating_scale=(1.0, 5.0))
    r = prepared.ratings
    per_user: dict[int, dict[str, list[int]]] = defaultdict(lambda: {"train": [], "val": []})
    for user, which, ts in zip(r["user_idx"], r["split"], epoch(r), strict=True):
        per_user[user][which].append(ts)
    for parts in per_user.values():
        n_u = len(parts["train"]) + len(parts["val"])
        assert len(parts["train"]) >= 1  # every user keeps a training rating
        assert len(parts["val"]) == min(n_u - 1, math.floor(n_u * fraction + 0.5))
        if parts["val"]:
            assert min(parts["val"]) >= max(parts["train"])
    assert prepared.stats.n_val_cold_user == 0


@SETTINGS
@given(n=st.integers(min_value=1, max_value=300), fraction=fractions, seed=st.integers(0, 10**6))
def test_random_split_exact_count_and_seeded(n: int, fraction: float, seed: int) -> None:
    frame = pl.DataFrame(
        {
            "user_idx": pl.Series(np.arange(n) // 3, dtype=pl.Int32),
            "item_idx": pl.Series(np.arange(n) % 3, dtype=pl.Int32),
            "ts": pl.Series([None] * n, dtype=pl.Datetime("us")),  # random needs no time
        }
    )
    split = SplitConfig(kind="random", val_fraction=fraction, seed=seed)
    mask = split_mask(frame, split, origin="x")
    assert mask.dtype == np.bool_ and mask.shape == (n,)
    assert int(mask.sum()) == expected_val_count(n, fraction)
    assert np.array_equal(mask, split_mask(frame, split, origin="x"))


def test_random_split_seed_changes_the_choice() -> None:
    frame = pl.DataFrame(
        {
            "user_idx": pl.Series(range(200), dtype=pl.Int32),
            "item_idx": pl.Series([0] * 200, dtype=pl.Int32),
            "ts": pl.Series([None] * 200, dtype=pl.Datetime("us")),
        }
    )
    masks = [
        split_mask(frame, SplitConfig(kind="random", val_fraction=0.1, seed=s), origin="x")
        for s in range(3)
    ]
    assert all(int(m.sum()) == 20 for m in masks)
    assert not np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[1], masks[2])


@pytest.mark.parametrize("kind", ["time", "user-time"])
def test_time_splits_need_timestamps(kind: str) -> None:
    rows: list[Row] = [(1, 1, 3.0, 5), (1, 2, 4.0, None), (2, 1, 5.0, 7)]
    split = SplitConfig(kind=kind, val_fraction=0.3)  # type: ignore[arg-type]
    with pytest.raises(InputDataError, match=rf"hypothesis\.csv: --split {kind} needs a timestamp"):
        prepare(raw_of(rows), split=split, rating_scale=(1.0, 5.0))
    random = prepare(raw_of(rows), split=SplitConfig(kind="random"), rating_scale=(1.0, 5.0))
    assert random.ratings.height == 3


# --- ids and scale as functions -------------------------------------------------------------


@SETTINGS
@given(
    ids=st.one_of(
        st.lists(st.integers(-(2**40), 2**40), max_size=40),
        st.lists(st.text(max_size=5), max_size=40),
    )
)
def test_dense_ids_round_trip(ids: list[Any]) -> None:
    series = pl.Series("id", ids, dtype=pl.Int64 if ids and isinstance(ids[0], int) else pl.String)
    index, uniques = dense_ids(series)
    assert index.dtype == pl.Int32 and len(index) == len(ids)
    assert uniques.to_list() == sorted(set(ids))
    assert sorted(set(index.to_list())) == list(range(len(uniques)))
    assert uniques.gather(index).to_list() == ids  # mapping back reproduces the raw ids


@SETTINGS
@given(
    lo=st.floats(-1e6, 1e6),
    width=st.floats(1e-3, 1e6),
    parts=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20),
)
def test_normalise_round_trips(lo: float, width: float, parts: list[float]) -> None:
    hi = lo + width
    values = [lo + p * (hi - lo) for p in parts]
    frame = pl.DataFrame({"r": values}).with_columns(n=normalise(pl.col("r"), lo, hi))
    # Serving maps a normalised score back to stars as n * (hi - lo) + lo.
    frame = frame.with_columns(back=pl.col("n") * (hi - lo) + lo)
    tolerance = 1e-9 * max(abs(lo), abs(hi), 1.0)
    for value, norm, back in frame.iter_rows():
        assert -1e-9 <= norm <= 1 + 1e-9
        assert back == pytest.approx(value, abs=tolerance)
    assert pl.select(normalise(pl.lit(lo), lo, hi)).item() == 0.0
    assert pl.select(normalise(pl.lit(hi), lo, hi)).item() == pytest.approx(1.0)


@SETTINGS
@given(rows=any_rows)
def test_rating_norm_matches_the_scale(rows: list[Row]) -> None:
    prepared = prepare(raw_of(rows), split=SplitConfig(kind="random"), rating_scale=(0.5, 5.0))
    r = prepared.ratings
    assert (r["rating_norm"] - (r["rating"] - 0.5) / 4.5).abs().max() < 1e-12  # type: ignore[operator]
    assert prepared.stats.rating_min == 0.5 and prepared.stats.rating_max == 5.0


def test_infer_scale() -> None:
    frame = pl.DataFrame({"rating": [2.0, 7.0, 3.5]})
    assert infer_scale(frame, origin="f", declared=None) == (2.0, 7.0)
    assert infer_scale(frame, origin="f", declared=(0.0, 10.0)) == (0.0, 10.0)
    with pytest.raises(InputDataError, match=r"f: ratings span \[2.0, 7.0\] outside"):
        infer_scale(frame, origin="f", declared=(1.0, 5.0))
    with pytest.raises(
        InputDataError, match=r"every rating is 4\.0.*--rating-min and --rating-max"
    ):
        infer_scale(pl.DataFrame({"rating": [4.0, 4.0]}), origin="f", declared=None)
