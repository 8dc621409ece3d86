"""`EpochData`: what every training step reads, built once per run on the device.

Kept apart from the loop (mfbatch.training.loop) so the loop stays orchestration: the
per-rating weights, the by-user index and the sampling distribution are built here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mfbatch.training import objectives
from mfbatch.training.tensors import Csr, Interactions


@dataclass(frozen=True)
class EpochData:
    """What every step needs, built once per run on the training device."""

    data: Interactions
    by_user: Csr
    active_users: torch.Tensor  # users with at least one rating: the softmax epoch
    log_q: torch.Tensor  # log sampling probability per item (sampled softmax)
    all_items: torch.Tensor
    # Per rating, in `by_user.indices` order: its weight within its user (softmax losses).
    weights: torch.Tensor | None = None
    # Per rating, in the same order: its interaction weight (UserBatch.counts); None: ones.
    counts: torch.Tensor | None = None

    def steps(self, users_a_step: int) -> int:
        """A softmax epoch's steps: the users with ratings in batches of `users_a_step`."""
        return -(-self.active_users.numel() // max(1, users_a_step))

    @staticmethod
    def build(
        data: Interactions,
        n_users: int,
        n_items: int,
        sampler: str,
        recency_half_life: float = 0.0,
    ) -> EpochData:
        device = data.users.device
        counts = torch.bincount(data.items, minlength=n_items).double()
        if sampler == "uniform":
            q = torch.full((n_items,), 1.0 / n_items, device=device, dtype=torch.float64)
        elif sampler == "popularity":
            # +1: every item can be drawn, so no logit goes uncorrected by an infinite log q.
            q = (counts + 1.0) / (counts.sum() + n_items)
        else:  # in-batch, mixed: (some) items come from the batch, with frequency q
            q = counts / counts.sum().clamp(min=1.0)
        user_counts = torch.bincount(data.users, minlength=n_users)
        weights = None
        if recency_half_life > 0.0 and data.ts is not None:
            weights = objectives.recency_weights(data.users, data.ts, n_users, recency_half_life)
            weights = weights[Csr.order(data.users, data.items)]
        return EpochData(
            data=data,
            by_user=Csr.build(data.users, data.items, n_users),
            active_users=torch.nonzero(user_counts).squeeze(1),
            log_q=q.log().float(),
            all_items=torch.arange(n_items, device=device),
            weights=weights,
            counts=None
            if data.weights is None
            else data.weights[Csr.order(data.users, data.items)],
        )
