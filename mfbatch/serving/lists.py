"""Top-K lists for a set of users: the one way both roles build them.

`score` (serving) and `evaluate` (measuring) differ only in the plan they hand over: which
ratings are masked, which users count as cold, which popularity the fallback ranks by.
The lists themselves come from here, so a figure `evaluate` reports describes exactly the
kind of list `score` serves.

- Users with at least one rating the model trained on go through the compiled graph.
- Users with none would be scored from an untrained (zeroed) vector: they get the most
  popular items they have not rated instead, marked `source = 'popularity'`.
- Users the plan folds in (serving only: ratings the model has not seen) go through the
  same graph from a vector solved at serving time, marked `source = 'fold-in'`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from mfbatch.serving.csr import SeenItems
from mfbatch.serving.session import Pending, Scorer

MODEL = "model"
POPULARITY = "popularity"
FOLD_IN = "fold-in"


def _strings(values: list[str]) -> pa.Array:
    """A few Python strings as Arrow, built from buffers (not pa.array: see arrow_array)."""
    data = "".join(values).encode()
    offsets = np.cumsum([0, *(len(v.encode()) for v in values)], dtype=np.int32)
    return pa.Array.from_buffers(
        pa.string(), len(values), [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )


# `source` is dictionary-encoded: these are its codes, in SOURCES' order.
MODEL_CODE, POPULARITY_CODE, FOLD_IN_CODE = 0, 1, 2
SOURCES = _strings([MODEL, POPULARITY, FOLD_IN])


def arrow_array(values: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """A numeric numpy array as Arrow (nulls where `valid` is False), sharing its memory.

    Not pa.array: that imports pandas to ask whether its input is a pandas object, ~0.2 s
    of every `mfbatch score` start-up for a library the scorer never uses.
    """
    values = np.ascontiguousarray(values)
    bitmap = None if valid is None else pa.py_buffer(np.packbits(valid, bitorder="little"))
    nulls = 0 if valid is None else int(len(valid) - np.count_nonzero(valid))
    return pa.Array.from_buffers(
        pa.from_numpy_dtype(values.dtype),
        len(values),
        [bitmap, pa.py_buffer(values)],
        null_count=nulls,
    )


@dataclass(frozen=True)
class ListPlan:
    users: np.ndarray  # int64 user_idx to list
    seen: SeenItems  # per user: items never offered (rated)
    item_mask: np.ndarray  # float32 [n_items]: 0 offered, -inf never (deny lists, untrained)
    cold: np.ndarray  # bool [n_users]: no rating the model trained on
    popularity: np.ndarray  # int64 [n_items]: ratings per item, what the fallback ranks by
    k: int
    folded: np.ndarray | None = None  # int64 [n_users]: row in folded_rows, -1 if not folded
    folded_rows: np.ndarray | None = None  # float32 [F, d+2]: U_aug-layout rows (fold-in)


@dataclass(frozen=True)
class ListBatch:
    users: np.ndarray  # [B] user_idx
    items: np.ndarray  # [B, k] int64
    scores: np.ndarray  # [B, k] float32, best first; -inf where nothing is left to offer
    from_model: np.ndarray  # bool [B]: the graph made the list (trained or folded-in vector)
    folded: np.ndarray | None = None  # bool [B]: from a folded-in vector

    def empty_users(self) -> np.ndarray:
        """Users of the batch left with no item at all."""
        return self.users[~np.isfinite(self.scores).any(axis=1)]


def fitted_counts(
    trained: Mapping[str, np.ndarray], n_users: int, n_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """(ratings per user, ratings per item) a run was fitted on, from a `trained_counts`
    query's (kind, idx, n) columns: zero marks a cold user or an item never offered."""
    counts = {"user": np.zeros(n_users, np.int64), "item": np.zeros(n_items, np.int64)}
    for kind, column in counts.items():
        rows = trained["kind"] == kind
        column[trained["idx"][rows]] = trained["n"][rows]
    return counts["user"], counts["item"]


def fitted_counts_less(
    seen: SeenItems,
    popularity: np.ndarray,
    untrained: Mapping[str, np.ndarray],
    n_users: int,
    n_items: int,
) -> tuple[np.ndarray, np.ndarray]:
    """`fitted_counts` from every rating (`seen` per user, `popularity` per item) less the
    (user_idx, item_idx) rows the run was not fitted on: two bincounts of what is read
    anyway instead of a GROUP BY over every rating."""
    users = np.asarray(untrained["user_idx"], dtype=np.int64)
    items = np.asarray(untrained["item_idx"], dtype=np.int64)
    per_user = np.diff(seen.indptr)[:n_users] - np.bincount(users, minlength=n_users)
    per_item = popularity[:n_items] - np.bincount(items, minlength=n_items)
    return per_user, per_item


def numpy_view(column: pa.ChunkedArray, dtype: type[np.generic]) -> np.ndarray:
    """A numeric (or dictionary-encoded: its indices) column without nulls as numpy.

    Not .to_numpy(): pyarrow imports pandas for that too (see arrow_array).
    """
    chunk = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    if isinstance(chunk, pa.DictionaryArray):
        chunk = chunk.indices
    assert chunk.null_count == 0, "a column with nulls has no plain numpy view"
    size = np.dtype(dtype).itemsize
    return np.frombuffer(
        chunk.buffers()[1], dtype=dtype, count=len(chunk), offset=chunk.offset * size
    )


def popularity_order(popularity: np.ndarray) -> np.ndarray:
    """Items by rating count, most first; ties by index (the SQL baseline's ORDER BY)."""
    return np.lexsort((np.arange(len(popularity)), -popularity))


def popularity_top_k(
    users: np.ndarray,
    seen: SeenItems,
    item_mask: np.ndarray,
    popularity: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(items, scores = rating counts) of each user's K most popular unrated allowed items."""
    order = popularity_order(popularity)
    order = order[(item_mask[order] == 0) & (popularity[order] > 0)]
    lengths = seen.indptr[users + 1] - seen.indptr[users]
    # Only the first K + (most items any of these users rated) candidates can make a list.
    candidates = order[: k + int(lengths.max(initial=0))]
    position = np.full(len(popularity), -1, dtype=np.int64)
    position[candidates] = np.arange(len(candidates))
    taken = np.zeros((len(users), len(candidates)), dtype=bool)
    pairs = seen.pairs(users)
    where = position[pairs[:, 1]]
    hit = where >= 0
    taken[pairs[hit, 0], where[hit]] = True
    # Stable: the first K untaken candidates of each row, in popularity order.
    pick = np.argsort(taken, axis=1, kind="stable")[:, :k]
    items = np.full((len(users), k), -1, dtype=np.int64)
    scores = np.full((len(users), k), -np.inf, dtype=np.float32)
    width = pick.shape[1]
    offered = ~np.take_along_axis(taken, pick, axis=1)
    chosen = candidates[pick]
    items[:, :width] = np.where(offered, chosen, -1)
    scores[:, :width] = np.where(offered, popularity[chosen].astype(np.float32), -np.inf)
    return items, scores


@dataclass(frozen=True)
class _Started:
    """A batch whose trained users are queued on the scorer."""

    users: np.ndarray
    cold: np.ndarray
    folded: np.ndarray
    warm: Pending | None


def _start(scorer: Scorer, plan: ListPlan, users: np.ndarray) -> _Started:
    cold = plan.cold[users]
    folded = np.zeros(len(users), dtype=bool)
    if plan.folded is not None:
        folded = (plan.folded[users] >= 0) & ~cold
    warm = ~cold & ~folded
    pending = (
        scorer.submit_top_k(users[warm], plan.seen, plan.item_mask, plan.k) if warm.any() else None
    )
    return _Started(users, cold, folded, pending)


def _finish(scorer: Scorer, plan: ListPlan, batch: _Started) -> ListBatch:
    users, cold, folded, k = batch.users, batch.cold, batch.folded, plan.k
    items = np.full((len(users), k), -1, dtype=np.int64)
    scores = np.full((len(users), k), -np.inf, dtype=np.float32)
    if batch.warm is not None:
        warm = ~cold & ~folded
        items[warm], scores[warm] = batch.warm()
    if folded.any():
        assert plan.folded is not None and plan.folded_rows is not None
        rows = plan.folded_rows[plan.folded[users[folded]]]
        fold_items, fold_scores = scorer.top_k_rows(
            users[folded], rows, plan.seen, plan.item_mask, k
        )
        items[folded], scores[folded] = fold_items, fold_scores
    if cold.any():
        cold_items, cold_scores = popularity_top_k(
            users[cold], plan.seen, plan.item_mask, plan.popularity, k
        )
        items[cold], scores[cold] = cold_items, cold_scores
    return ListBatch(users, items, scores, ~cold, folded)


def build_lists(scorer: Scorer, plan: ListPlan, batch_size: int) -> Iterator[ListBatch]:
    """The plan's users in batches: the graph for trained users, popularity for cold ones.

    Each batch's trained users are queued before the one before it is assembled and
    handed on, so the scorer's workers never wait for the caller.
    """
    ahead: _Started | None = None
    for start in range(0, len(plan.users), batch_size):
        started = _start(scorer, plan, plan.users[start : start + batch_size])
        if ahead is not None:
            yield _finish(scorer, plan, ahead)
        ahead = started
    if ahead is not None:
        yield _finish(scorer, plan, ahead)


def to_arrow(batch: ListBatch, user_ids: pa.Array, item_ids: pa.Array) -> pa.Table:
    """A batch's lists as rows with raw ids; slots with nothing left to offer dropped."""
    k = batch.items.shape[1]
    valid = np.isfinite(batch.scores)
    users = np.broadcast_to(batch.users[:, None], batch.items.shape)[valid]
    ranks = np.broadcast_to(np.arange(1, k + 1, dtype=np.int32)[None, :], batch.items.shape)
    kind = np.where(batch.from_model, MODEL_CODE, POPULARITY_CODE)
    if batch.folded is not None:
        kind[batch.folded] = FOLD_IN_CODE
    source = np.broadcast_to(kind.astype(np.int8)[:, None], batch.items.shape)
    return pa.table(
        {
            # Dictionary-encoded: indices into the raw-id arrays, no string copied per row.
            "user_id": pa.DictionaryArray.from_arrays(
                arrow_array(users.astype(np.int32)), user_ids
            ),
            "item_id": pa.DictionaryArray.from_arrays(
                arrow_array(batch.items[valid].astype(np.int32)), item_ids
            ),
            "rank": arrow_array(ranks[valid]),
            "score": arrow_array(batch.scores[valid].astype(np.float64)),
            "source": pa.DictionaryArray.from_arrays(arrow_array(source[valid]), SOURCES),
        }
    )


def to_lean_arrow(batch: ListBatch) -> pa.Table:
    """A batch's lists as the history stores them: integers and the graph's float32 score
    (user_idx, item_idx, rank, score, source code); slots with nothing to offer dropped."""
    k = batch.items.shape[1]
    valid = np.isfinite(batch.scores)
    users = np.broadcast_to(batch.users[:, None], batch.items.shape)[valid]
    ranks = np.broadcast_to(np.arange(1, k + 1, dtype=np.int32)[None, :], batch.items.shape)
    kind = np.where(batch.from_model, MODEL_CODE, POPULARITY_CODE).astype(np.int8)
    if batch.folded is not None:
        kind[batch.folded] = FOLD_IN_CODE
    source = np.broadcast_to(kind[:, None], batch.items.shape)
    return pa.table(
        {
            "user_idx": arrow_array(users.astype(np.int32)),
            "item_idx": arrow_array(batch.items[valid].astype(np.int32)),
            "rank": arrow_array(ranks[valid]),
            "score": arrow_array(batch.scores[valid].astype(np.float32)),
            "source": arrow_array(source[valid]),
        }
    )


def with_rating(table: pa.Table, objective: str, lo: float, hi: float) -> pa.Table:
    """`to_arrow`'s table plus predicted_rating: stars where the score is one (a rating
    model's score on model and fold-in rows), null for ranking scores and popularity rows."""
    if objective == "rating":
        scores = numpy_view(table.column("score"), np.float64)
        # Trained and folded-in vectors alike (a rating model's fold-in solves its offset).
        from_model = numpy_view(table.column("source"), np.int8) != POPULARITY_CODE
        stars = np.where(from_model, np.clip(scores, 0.0, 1.0) * (hi - lo) + lo, np.nan)
        predicted = arrow_array(stars, valid=from_model)
    else:
        # A ranking model's score orders items but is not on the star scale.
        predicted = pa.nulls(table.num_rows, pa.float64())
    return table.append_column("predicted_rating", predicted)
