"""The one CSR type of serving: items per user, on the CPU in numpy.

Seen items (masked from every list) and fold-in ratings (solved into user vectors) are
both items grouped by user. Training has its own twin in torch on the training device
(mfbatch.training.loop.Csr): serving never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Values per bincount call in `counts`: its int64 copy (8 MB) is reused from the heap.
_COUNT_CHUNK = 1 << 20


def counts(values: np.ndarray, n: int) -> np.ndarray:
    """How often each of 0..n-1 occurs in `values` (int64 [n]), in chunks.

    np.bincount converts int32 input to int64 first: over every rating that is a fresh
    74 MB (9.3M ratings) whose page faults measured 0.06-0.23 s of a score's start-up,
    against ~0.03 s for the same counts taken a chunk at a time.
    """
    total = np.zeros(n, dtype=np.int64)
    for start in range(0, len(values), _COUNT_CHUNK):
        total += np.bincount(values[start : start + _COUNT_CHUNK], minlength=n)[:n]
    return total


@dataclass(frozen=True)
class SeenItems:
    """Items each user must not be recommended, as CSR over user_idx (integer indices)."""

    indptr: np.ndarray
    indices: np.ndarray

    @staticmethod
    def from_pairs(users: np.ndarray, items: np.ndarray, n_users: int) -> SeenItems:
        """From (user, item) pairs in any order (a linear check when already by user)."""
        if users.size and not bool(np.all(users[1:] >= users[:-1])):
            order = np.argsort(users, kind="stable")
            users, items = users[order], items[order]
        return SeenItems.from_sorted(users, items, n_users)

    @staticmethod
    def from_sorted(users: np.ndarray, items: np.ndarray, n_users: int) -> SeenItems:
        """From (user, item) pairs sorted by user."""
        # Each user's first row, by binary search over the sorted users: n_users searches
        # instead of a pass over every rating (see `counts`).
        users = np.asarray(users)
        # Searched in the users' own integer type: a mixed one would copy every rating.
        kind = users.dtype if users.dtype in (np.int32, np.int64) else np.dtype(np.int64)
        bounds = np.arange(n_users + 1, dtype=kind)
        indptr = np.searchsorted(users, bounds).astype(np.int64, copy=False)
        # Integer items are kept as they come (int32 from the database): an int64 copy of
        # every rating is ~75 MB of fresh pages at 100k users for nothing the masks need.
        items = np.asarray(items)
        return SeenItems(indptr, items if items.dtype.kind in "iu" else items.astype(np.int64))

    def _gather(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(seen items per batch user, those items concatenated in batch order)."""
        starts = self.indptr[users]
        lengths = self.indptr[users + 1] - starts
        total = int(lengths.sum())
        # Position of each entry inside its user's slice, without a Python loop.
        offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
        return lengths, self.indices[np.arange(total, dtype=np.int64) + offsets]

    def pairs(self, users: np.ndarray) -> np.ndarray:
        """[S, 2] (row in `users`, item) for every seen item of the batch: ScatterND indices."""
        lengths, items = self._gather(users)
        out = np.empty((len(items), 2), dtype=np.int64)
        out[:, 0] = np.repeat(np.arange(len(users), dtype=np.int64), lengths)
        out[:, 1] = items
        return out

    def flat_positions(self, users: np.ndarray, n_cols: int) -> np.ndarray:
        """Positions in a C-order [len(users), n_cols] matrix of every seen item below
        n_cols: what the CPU path writes -inf to (one flat index a pair, not two, measured
        ~2.5 of 41 ms a 1,677-user batch less than `pairs` + 2-D fancy indexing)."""
        lengths, items = self._gather(users)
        flat = np.repeat(np.arange(len(users), dtype=np.int64) * n_cols, lengths) + items
        return flat if not items.size or int(items.max()) < n_cols else flat[items < n_cols]
