"""The matrix-factorization module from the design. It only computes.

    r_hat(u, i) = mu + b_u + b_i + <f(p_u), f(q_i)>,   f = dropout . batchnorm (each optional)

on the [0, 1] rating scale. The trainer (mfbatch.stages.train) owns losses, sampling and data;
export (mfbatch.artifact.graph) folds the eval-mode module into plain tables for ONNX.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelShape:
    """Everything needed to rebuild the module before loading its state dict."""

    n_users: int
    n_items: int
    dim: int
    dropout: float
    batch_norm: bool
    sparse: bool = False


class MatrixFactorization(nn.Module):
    def __init__(self, shape: ModelShape, *, init_std: float = 0.05) -> None:
        super().__init__()
        self.shape = shape
        self.user_emb = nn.Embedding(shape.n_users, shape.dim, sparse=shape.sparse)
        self.item_emb = nn.Embedding(shape.n_items, shape.dim, sparse=shape.sparse)
        # Biases start at zero (the design); kept as 1-wide embeddings so sparse optimisers
        # can update just the rows a batch touches.
        self.global_bias = nn.Parameter(torch.zeros(1))
        self.user_bias = nn.Embedding(shape.n_users, 1, sparse=shape.sparse)
        self.item_bias = nn.Embedding(shape.n_items, 1, sparse=shape.sparse)
        nn.init.normal_(self.user_emb.weight, std=init_std)
        nn.init.normal_(self.item_emb.weight, std=init_std)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)
        self.user_norm: nn.Module = nn.BatchNorm1d(shape.dim) if shape.batch_norm else nn.Identity()
        self.item_norm: nn.Module = nn.BatchNorm1d(shape.dim) if shape.batch_norm else nn.Identity()
        self.dropout = nn.Dropout(shape.dropout)

    def user_parameters(self) -> list[torch.Tensor]:
        """The user tables (vectors and biases): what the lazy user update and the user
        solve step, apart from the rest."""
        return [self.user_emb.weight, self.user_bias.weight]

    def user_vectors(self, users: torch.Tensor) -> torch.Tensor:
        return self.user_rows(users)[1]

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        return self.item_rows(items)[1]

    def user_rows(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(table rows p_u, f(p_u)): one lookup for a loss that needs both (L2 and logits)."""
        raw = self.user_emb(users)
        return raw, self.dropout(self.user_norm(raw))

    def item_rows(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(table rows q_i, f(q_i))."""
        raw = self.item_emb(items)
        return raw, self.dropout(self.item_norm(raw))

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Predicted normalised rating for each (user, item) pair."""
        return self.global_bias + self.user_bias(users).squeeze(-1) + self.pair_logits(users, items)

    def pair_logits(
        self, users: torch.Tensor, items: torch.Tensor, user_vec: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`item_logits` for matching (user, item) pairs: <f(p_u), f(q_i)> + b_i."""
        u = self.user_vectors(users) if user_vec is None else user_vec
        return (u * self.item_vectors(items)).sum(-1) + self.item_bias(items).squeeze(-1)

    def item_logits(
        self, users: torch.Tensor, items: torch.Tensor, user_vec: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scores of every user in `users` against every item in `items` (B x N).

        mu + b_u is left out: it is constant per user, so it changes no ranking.
        """
        u = self.user_vectors(users) if user_vec is None else user_vec
        return u @ self.item_vectors(items).T + self.item_bias(items).squeeze(-1)

    @torch.no_grad()
    def folded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """Eval-mode tables with BatchNorm folded in: (P, Q, b_u, b_i, mu).

        Dropout is the identity at inference; BatchNorm in eval mode is an affine map per
        dimension, so applying it to the whole table once gives the same vectors.
        """
        was_training = self.training
        self.eval()
        all_users = torch.arange(self.shape.n_users, device=self.user_emb.weight.device)
        all_items = torch.arange(self.shape.n_items, device=self.item_emb.weight.device)
        p = self.user_vectors(all_users)
        q = self.item_vectors(all_items)
        self.train(was_training)
        return (
            p,
            q,
            self.user_bias.weight.squeeze(-1),
            self.item_bias.weight.squeeze(-1),
            float(self.global_bias.item()),
        )
