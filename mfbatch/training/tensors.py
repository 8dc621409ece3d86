"""Ratings as tensors on the training device: the pairs, and items grouped by user (CSR)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Interactions:
    """Rated (user, item, normalised rating) triples on the training device."""

    users: torch.Tensor  # int64
    items: torch.Tensor  # int64
    ratings: torch.Tensor  # float32 in [0, 1]
    # When each rating was made (any monotone unit), for `--recency-half-life`; None: unknown.
    ts: torch.Tensor | None = None
    # Each interaction's weight in the softmax losses (ratings.weight); None: all ones.
    weights: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.users.numel())


@dataclass(frozen=True)
class Csr:
    """Items per user: items of user u are indices[indptr[u]:indptr[u+1]]."""

    indptr: torch.Tensor
    indices: torch.Tensor

    @staticmethod
    def build(users: torch.Tensor, items: torch.Tensor, n_users: int) -> Csr:
        order = Csr.order(users, items)
        counts = torch.bincount(users, minlength=n_users)
        indptr = torch.zeros(n_users + 1, dtype=torch.int64, device=users.device)
        indptr[1:] = torch.cumsum(counts, 0)
        return Csr(indptr, items[order])

    def rows_of(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row position in `users`, item) for every item of every user in `users`."""
        rows, at = self.positions_of(users)
        return rows, self.indices[at]

    def positions_of(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row position in `users`, position in `indices`) for every item of `users`."""
        starts, ends = self.indptr[users], self.indptr[users + 1]
        lengths = ends - starts
        rows = torch.repeat_interleave(torch.arange(users.numel(), device=users.device), lengths)
        offsets = torch.cumsum(lengths, 0) - lengths
        within = torch.arange(rows.numel(), device=users.device) - offsets[rows]
        return rows, starts[rows] + within

    @staticmethod
    def order(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """The permutation `build` applies to the ratings (by user, then item)."""
        return torch.argsort(users * (int(items.max().item()) + 1 if items.numel() else 1) + items)
