"""ONNX Runtime top-K against a numpy oracle: SeenItems, the graphs' top-K with allow lists
and seen items, batches, and every path to the spool (graph, batch size, writer thread).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st
from inference_oracle import PROPERTY, _mask, _rated, _scorer, _seen, _tables

from mfbatch.artifact.graph import build_graph
from mfbatch.errors import ModelError
from mfbatch.serving.lists import ListBatch, ListPlan, build_lists, to_arrow
from mfbatch.serving.session import FAST_CPU_BATCH_MB, Scorer
from mfbatch.serving.spool import Spooler

TIE = 1e-5  # scores closer than this may come back in either order


GRAPHS = ("split", "whole")  # every path that can run on this machine, one oracle


def _oracle(
    users_aug: np.ndarray,
    items_aug_t: np.ndarray,
    users: np.ndarray,
    per_user: list[list[int]],
    mask: np.ndarray,
) -> np.ndarray:
    """Every masked score of the batch, in float64: what the graph should rank."""
    full = users_aug[users].astype(np.float64) @ items_aug_t.astype(np.float64)
    full += mask.astype(np.float64)
    for row, user in enumerate(users):
        full[row, per_user[user]] = -np.inf
    return full


def _assert_top_k_matches(full: np.ndarray, items: np.ndarray, scores: np.ndarray) -> None:
    """ORT's (items, scores) are the oracle's argsort, except inside near-ties."""
    k = items.shape[1]
    order = np.argsort(-full, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(full, order, axis=1)
    finite = np.isfinite(best)
    # -inf exactly where fewer than k candidates are left, and nowhere else.
    assert (np.isfinite(scores) == finite).all()
    np.testing.assert_allclose(scores[finite], best[finite], rtol=0, atol=TIE)
    # Each returned item really has the score reported for it.
    got = np.take_along_axis(full, items, axis=1)
    np.testing.assert_allclose(got[finite], scores[finite], rtol=0, atol=TIE)
    for row, col in zip(*np.nonzero(finite), strict=True):
        if items[row, col] != order[row, col]:
            neighbours = best[row, max(col - 1, 0) : col + 2]
            gaps = np.abs(neighbours - best[row, col])
            assert np.sort(gaps)[1] < TIE, (row, col, items[row], order[row])
    # Items in a row are distinct.
    for row in range(items.shape[0]):
        assert len(set(items[row].tolist())) == k


# --- SeenItems ------------------------------------------------------------------------------


@PROPERTY
@given(
    per_user=st.lists(
        st.lists(st.integers(0, 30), max_size=8, unique=True), min_size=1, max_size=12
    ),
    picks=st.data(),
    dtype=st.sampled_from([np.int64, np.int32]),
)
def test_seen_pairs_match_a_python_loop(
    per_user: list[list[int]], picks: st.DataObject, dtype: type
) -> None:
    n_users = len(per_user)
    # Any batch: unsorted, repeated users, users with nothing seen, or no users at all.
    batch = picks.draw(st.lists(st.integers(0, n_users - 1), max_size=15))
    users: np.ndarray = np.array(batch, dtype=dtype)
    seen = _seen(per_user)
    expected = [(row, item) for row, user in enumerate(batch) for item in per_user[user]]
    pairs = seen.pairs(users)
    assert pairs.dtype == np.int64
    assert pairs.shape == (len(expected), 2)
    assert [tuple(p) for p in pairs.tolist()] == expected
    # The flat form the CPU path masks with: the same pairs, minus items past the columns.
    n_cols = picks.draw(st.integers(1, 32))
    flat = seen.flat_positions(users, n_cols)
    assert flat.tolist() == [row * n_cols + item for row, item in expected if item < n_cols]


def test_seen_items_csr_layout() -> None:
    seen = _seen([[3, 1], [], [0], []])
    assert seen.indptr.tolist() == [0, 2, 2, 3, 3]
    assert seen.indices.tolist() == [3, 1, 0]
    assert seen.pairs(np.array([3, 2, 0])).tolist() == [[1, 0], [2, 3], [2, 1]]


# --- Top-K against numpy ----------------------------------------------------------------------


@PROPERTY
@given(
    seed=st.integers(0, 2**32 - 1),
    k=st.integers(1, 23),
    deny=st.floats(0.0, 0.6),
    graph=st.sampled_from(GRAPHS),
)
def test_top_k_equals_a_numpy_argsort(
    graphs: Path, seed: int, k: int, deny: float, graph: str
) -> None:
    rng = np.random.default_rng(seed)
    n_users, n_items = 9, 23
    users_aug, items_aug_t = _tables(rng, n_users, n_items, 5)
    per_user = _rated(rng, n_users, n_items, 12)
    per_user[0] = list(range(n_items - 2))  # fewer than k candidates for most k
    mask = _mask((rng.random(n_items) >= deny).tolist())
    batch = rng.permutation(n_users)
    scorer = _scorer(graphs, users_aug, items_aug_t, graph)
    assert (scorer.session is not None) == (graph == "whole")
    items, scores = scorer.top_k(batch, _seen(per_user), mask, k)
    assert items.shape == scores.shape == (n_users, k)
    assert items.dtype == np.int64 and scores.dtype == np.float32
    _assert_top_k_matches(_oracle(users_aug, items_aug_t, batch, per_user, mask), items, scores)


@pytest.mark.parametrize("graph", GRAPHS)
def test_top_k_with_an_allow_list_and_seen_items(graphs: Path, graph: str) -> None:
    rng = np.random.default_rng(7)
    users_aug, items_aug_t = _tables(rng, 4, 10, 4)
    per_user = [[1, 2], [], [0, 5, 6, 7, 8, 9], [3]]
    allowed = [i in (0, 1, 3, 4, 7) for i in range(10)]
    items, scores = _scorer(graphs, users_aug, items_aug_t, graph).top_k(
        np.arange(4), _seen(per_user), _mask(allowed), 4
    )
    full = _oracle(users_aug, items_aug_t, np.arange(4), per_user, _mask(allowed))
    _assert_top_k_matches(full, items, scores)
    finite = [set(items[r][np.isfinite(scores[r])].tolist()) for r in range(4)]
    # Users 0, 2 and 3 have exactly their allowed unseen items; user 1 the best 4 of 5.
    assert (finite[0], finite[2], finite[3]) == ({0, 3, 4, 7}, {1, 3, 4}, {0, 1, 4, 7})
    assert len(finite[1]) == 4 and finite[1] < {0, 1, 3, 4, 7}


@pytest.mark.parametrize("graph", GRAPHS)
def test_batch_equals_one_user_at_a_time(graphs: Path, graph: str) -> None:
    rng = np.random.default_rng(11)
    n_users, n_items, k = 20, 31, 8
    users_aug, items_aug_t = _tables(rng, n_users, n_items, 7)
    per_user = _rated(rng, n_users, n_items, 26)
    seen = _seen(per_user)
    mask = _mask((rng.random(n_items) > 0.2).tolist())
    scorer = _scorer(graphs, users_aug, items_aug_t, graph)

    batch = rng.permutation(n_users)
    items, scores = scorer.top_k(batch, seen, mask, k)
    _assert_top_k_matches(_oracle(users_aug, items_aug_t, batch, per_user, mask), items, scores)
    for row, user in enumerate(batch):
        one_items, one_scores = scorer.top_k(np.array([user]), seen, mask, k)
        finite = np.isfinite(scores[row])
        assert (np.isfinite(one_scores[0]) == finite).all()
        assert one_items[0][finite].tolist() == items[row][finite].tolist(), user
        np.testing.assert_allclose(one_scores[0][finite], scores[row][finite], atol=1e-6)
    # Any split of the batch gives the same rows as well.
    for start in range(0, n_users, 6):
        part_items, _ = scorer.top_k(batch[start : start + 6], seen, mask, k)
        for offset, row in enumerate(range(start, min(start + 6, n_users))):
            finite = np.isfinite(scores[row])
            assert part_items[offset][finite].tolist() == items[row][finite].tolist()


# --- Every path to the spool: graph, batch size, the writer thread ----------------------------


def _spooled(scorer: Scorer, plan: ListPlan, batch: int, path: Path) -> dict[int, list[Any]]:
    """The lists as `score` spools them (writer thread included), read back per user."""
    user_ids = pa.array([str(u) for u in range(len(plan.cold))])
    item_ids = pa.array([str(i) for i in range(len(plan.item_mask))])
    spooler = Spooler(path, lambda lists: to_arrow(lists, user_ids, item_ids))
    try:
        for lists in build_lists(scorer, plan, batch):
            spooler.put(lists)
        assert spooler.close() is not None
    finally:
        spooler.stop()
    with pa.memory_map(str(path)) as source:
        rows = pa.ipc.open_file(source).read_all().to_pylist()
    out: dict[int, list[Any]] = {}
    for row in rows:
        out.setdefault(int(row["user_id"]), []).append(row)
    return out


@pytest.mark.parametrize("graph", GRAPHS)
def test_every_path_through_the_spool_equals_the_oracle(
    graphs: Path, tmp_path: Path, graph: str
) -> None:
    rng = np.random.default_rng(5)
    n_users, n_items, k = 41, 57, 7
    users_aug, items_aug_t = _tables(rng, n_users, n_items, 6)
    per_user = _rated(rng, n_users, n_items, 30)
    per_user[3] = list(range(36))  # fewer than k allowed items left
    allowed = (rng.random(n_items) > 0.15).tolist()  # a deny list...
    allowed[40:] = [False] * (n_items - 40)  # ...and an allow list of the first 40 items
    mask = _mask(allowed)
    users = rng.permutation(n_users)
    plan = ListPlan(
        users=users,
        seen=_seen(per_user),
        item_mask=mask,
        cold=np.zeros(n_users, dtype=bool),
        popularity=np.ones(n_items, dtype=np.int64),
        k=k,
    )
    scorer = _scorer(graphs, users_aug, items_aug_t, graph)
    full = _oracle(users_aug, items_aug_t, users, per_user, mask)
    lists = {}
    for batch in (1, 4, 9, n_users, FAST_CPU_BATCH_MB << 20):
        spooled = _spooled(scorer, plan, batch, tmp_path / f"{batch}.arrow")
        items = np.zeros((n_users, k), dtype=np.int64)
        scores = np.full((n_users, k), -np.inf, dtype=np.float32)
        for row, user in enumerate(users):
            got = spooled.get(int(user), [])
            assert [r["rank"] for r in got] == list(range(1, len(got) + 1))
            items[row, : len(got)] = [int(r["item_id"]) for r in got]
            scores[row, : len(got)] = [r["score"] for r in got]
            # Fill the slots with nothing left to offer as the graph does: distinct items.
            spare = [i for i in range(n_items) if i not in items[row, : len(got)]]
            items[row, len(got) :] = spare[: k - len(got)]
        _assert_top_k_matches(full, items, scores)
        assert len(spooled.get(3, [])) == sum(allowed[36:]) < k
        lists[batch] = {u: [(r["item_id"], r["rank"]) for r in rows] for u, rows in spooled.items()}
    # Not only each equal to the oracle within ties: the same lists, whatever the batch.
    assert all(other == lists[1] for other in lists.values())


@pytest.mark.parametrize("threads", [2, 3])
def test_a_batch_split_across_workers_equals_one_worker_and_the_oracle(
    graphs: Path, threads: int
) -> None:
    rng = np.random.default_rng(13)
    n_users, n_items, k = 1000, 50, 6
    users_aug, items_aug_t = _tables(rng, n_users, n_items, 5)
    per_user = _rated(rng, n_users, n_items, 47)
    allowed = (rng.random(n_items) > 0.2).tolist()
    mask, seen, users = _mask(allowed), _seen(per_user), rng.permutation(n_users)
    path = graphs / "sliced.onnx"
    meta = {"n_users": n_users, "n_items": n_items}
    onnx.save_model(build_graph(users_aug, items_aug_t, meta), str(path))
    one = Scorer(path, provider="cpu", threads=1)
    many = Scorer(path, provider="cpu", threads=threads)
    assert many.provider == f"cpu ({threads} threads)"
    items, scores = many.top_k(users, seen, mask, k)
    _assert_top_k_matches(_oracle(users_aug, items_aug_t, users, per_user, mask), items, scores)
    alone_items, alone_scores = one.top_k(users, seen, mask, k)
    np.testing.assert_array_equal(items, alone_items)
    np.testing.assert_array_equal(scores, alone_scores)
    # Folded-in rows take the same sliced path.
    rows = np.ascontiguousarray(users_aug[users])
    rows_items, rows_scores = many.top_k_rows(users, rows, seen, mask, k)
    np.testing.assert_array_equal(rows_items, items)
    np.testing.assert_allclose(rows_scores, scores, atol=1e-6)


def test_queued_batches_on_two_workers_equal_one_worker_and_fail_in_one_line(
    graphs: Path,
) -> None:
    """build_lists queues a batch before collecting the one before it: with two workers
    (slices of a batch, batches overlapping) the lists equal one worker's, batch by batch,
    trained, folded-in and cold users mixed; a failure on a worker is one ModelError."""
    rng = np.random.default_rng(17)
    n_users, n_items, k = 1500, 60, 5
    users_aug, items_aug_t = _tables(rng, n_users, n_items, 5)
    per_user = _rated(rng, n_users, n_items, 40)
    folded = np.full(n_users, -1, dtype=np.int64)
    folded[::7] = np.arange(len(folded[::7]))
    plan = ListPlan(
        users=rng.permutation(n_users),
        seen=_seen(per_user),
        item_mask=_mask((rng.random(n_items) > 0.1).tolist()),
        cold=rng.random(n_users) < 0.05,
        popularity=rng.integers(1, 50, n_items),
        k=k,
        folded=folded,
        folded_rows=np.ascontiguousarray(users_aug[::7] * 0.5),
    )
    path = graphs / "queued.onnx"
    onnx.save_model(build_graph(users_aug, items_aug_t, {"n_users": n_users}), str(path))
    one = Scorer(path, provider="cpu", threads=1)
    two = Scorer(path, provider="cpu", threads=2)
    for batch in (517, 600, n_users):  # two slices a batch, and one batch for everyone
        alone = list(build_lists(one, plan, batch))
        queued = list(build_lists(two, plan, batch))
        assert len(queued) == len(alone) == -(-n_users // batch)
        for a, b in zip(alone, queued, strict=True):
            np.testing.assert_array_equal(a.users, b.users)
            np.testing.assert_array_equal(a.items, b.items)
            np.testing.assert_array_equal(a.scores, b.scores)
            np.testing.assert_array_equal(a.from_model, b.from_model)
    # Several queued at once, collected out of order: each is still its own batch's lists.
    parts = [plan.users[i : i + 300] for i in range(0, 1200, 300)]
    pending = [two.submit_top_k(u, plan.seen, plan.item_mask, k) for u in parts]
    for users, wait in reversed(list(zip(parts, pending, strict=True))):
        items, scores = wait()
        want_items, want_scores = one.top_k(users, plan.seen, plan.item_mask, k)
        np.testing.assert_array_equal(items, want_items)
        np.testing.assert_array_equal(scores, want_scores)
    # A user index past the model's table fails inside ORT, on a worker: the caller gets
    # the one-line error when it collects, not a traceback from another thread.
    broken = two.submit_top_k(np.arange(n_users, n_users + 600), plan.seen, plan.item_mask, k)
    with pytest.raises(ModelError, match="ONNX Runtime failed on a batch of 600 users"):
        broken()


def test_workers_hold_no_more_score_rows_than_one_batch(graphs: Path) -> None:
    """Batches queued ahead and workers that take turns at them: together the workers' score
    buffers hold one batch's rows (what --memory-mb sizes), never one per slice in flight."""
    rng = np.random.default_rng(19)
    n_users, n_items, workers, batch = 4000, 40, 4, 600
    users_aug, items_aug_t = _tables(rng, n_users, n_items, 4)
    path = graphs / "budget.onnx"
    onnx.save_model(build_graph(users_aug, items_aug_t, {"n_users": n_users}), str(path))
    scorer = Scorer(path, provider="cpu", threads=workers)
    plan = ListPlan(
        users=np.arange(n_users),
        seen=_seen([[u % n_items] for u in range(n_users)]),
        item_mask=np.zeros(n_items, dtype=np.float32),
        cold=np.zeros(n_users, dtype=bool),
        popularity=np.ones(n_items, dtype=np.int64),
        k=3,
    )
    for _ in range(3):
        assert sum(len(b.users) for b in build_lists(scorer, plan, batch)) == n_users
    held = [buffer.shape[0] for buffer in scorer._buffers.values()]
    assert len(held) <= workers
    assert sum(held) <= batch + workers  # one batch, give or take a row a slice


def test_a_failure_on_the_writer_thread_reaches_the_caller(graphs: Path, tmp_path: Path) -> None:
    calls = 0
    error = OSError(28, "No space left on device")

    def convert(lists: ListBatch) -> pa.Table:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise error
        return pa.table({"n": pa.array(lists.users)})

    spooler = Spooler(tmp_path / "spool.arrow", convert)
    batch = ListBatch(np.arange(3), np.zeros((3, 1)), np.zeros((3, 1)), np.ones(3, dtype=bool))
    with pytest.raises(OSError) as info:
        for _ in range(50):  # the failure surfaces on a later put() or on close()
            spooler.put(batch)
        spooler.close()
    spooler.stop()
    assert info.value is error and calls == 2
    assert not spooler._thread.is_alive()
