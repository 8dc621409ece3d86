"""The serving CSR and its counts against numpy's own (bincount, a Python loop)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mfbatch.serving import csr
from mfbatch.serving.csr import SeenItems, counts

pairs = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 60)), max_size=300)


@settings(max_examples=60, deadline=None)
@given(pairs=pairs, dtype=st.sampled_from([np.int32, np.int64, np.uint16]))
def test_csr_rows_hold_each_users_items_in_order(
    pairs: list[tuple[int, int]], dtype: type[np.integer]
) -> None:
    users = np.array([u for u, _ in pairs], dtype=dtype)
    items = np.array([i for _, i in pairs], dtype=np.int32)
    seen = SeenItems.from_pairs(users, items, 41)
    assert seen.indptr.dtype == np.int64 and len(seen.indptr) == 42
    np.testing.assert_array_equal(np.diff(seen.indptr), np.bincount(users, minlength=41))
    for user in range(41):
        want = [i for u, i in pairs if u == user]  # from_pairs keeps the order within a user
        got = seen.indices[seen.indptr[user] : seen.indptr[user + 1]].tolist()
        assert got == want


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.integers(0, 99), max_size=500), chunk=st.integers(1, 64))
def test_counts_equal_bincount_whatever_the_chunk(values: list[int], chunk: int) -> None:
    array = np.array(values, dtype=np.int32)
    original = csr._COUNT_CHUNK
    csr._COUNT_CHUNK = chunk  # several chunks, a ragged last one, or one
    try:
        got = counts(array, 100)
    finally:
        csr._COUNT_CHUNK = original
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, np.bincount(array, minlength=100))
