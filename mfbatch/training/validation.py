"""Validation during training: Recall/NDCG@K over rankings; RMSE/MAE on held-out pairs for
the rating objective on explicit ratings.

The ranking follows serving's rules (popularity for users with no train rating, untrained
items never offered), so the figures equal what `evaluate` measures from its lists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mfbatch.config import TrainConfig
from mfbatch.training.model import MatrixFactorization
from mfbatch.training.tensors import Csr, Interactions


@dataclass(frozen=True)
class Validation:
    """What `validate` scores against: held-out pairs and, for ranking, the masks."""

    pairs: Interactions
    train_items: Csr  # excluded from each user's ranking
    val_items: Csr  # relevant items
    rank_users: torch.Tensor  # users ranked for Recall/NDCG (a seeded sample when large)
    rating_min: float
    rating_max: float
    # What serving does, so the trainer measures the lists `evaluate` will build: users
    # with no train rating get the popularity list, items with none are never offered.
    popular: torch.Tensor | None = None  # item indices by train count desc, then index
    untrained_items: torch.Tensor | None = None  # bool [n_items]
    # Explicit ratings: RMSE/MAE mean something (for the rating objective). Implicit
    # feedback (every rating 1) has none to predict.
    explicit: bool = True

    @staticmethod
    def serving_rules(train_items: torch.Tensor, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(popularity order, untrained-item mask) from the items of the train split."""
        counts = torch.bincount(train_items, minlength=n_items)
        # Stable sort of -count: ties keep index order, as the SQL baseline's ORDER BY does.
        popular = torch.sort(-counts, stable=True).indices
        return popular, counts == 0


@dataclass(frozen=True)
class Metrics:
    # Only for the `rating` objective on explicit ratings: a ranking model's scores are
    # not ratings, so its RMSE would measure nothing (None).
    rmse: float | None = None
    mae: float | None = None
    recall: float | None = None
    ndcg: float | None = None


@torch.no_grad()
def validate(model: MatrixFactorization, val: Validation, config: TrainConfig) -> Metrics:
    """RMSE/MAE in stars on the held-out pairs (the rating objective on explicit ratings);
    Recall/NDCG@K over each user's ranking (ranking objectives, or --rank-metrics)."""
    model.eval()
    if config.objective != "rating" or not val.explicit:
        recall, ndcg = rank_metrics(model, val, config.top_k)
        return Metrics(recall=recall, ndcg=ndcg)
    span = val.rating_max - val.rating_min
    sq = ab = 0.0
    chunk = 1 << 16
    for start in range(0, len(val.pairs), chunk):
        sl = slice(start, start + chunk)
        pred = model(val.pairs.users[sl], val.pairs.items[sl]).float().clamp(0.0, 1.0)
        err = (pred - val.pairs.ratings[sl]) * span
        sq += float((err**2).sum())
        ab += float(err.abs().sum())
    n = max(len(val.pairs), 1)
    rmse, mae = math.sqrt(sq / n), ab / n
    if config.objective == "rating" and not config.rank_metrics:
        return Metrics(rmse=rmse, mae=mae)
    recall, ndcg = rank_metrics(model, val, config.top_k)
    return Metrics(rmse=rmse, mae=mae, recall=recall, ndcg=ndcg)


@torch.no_grad()
def rank_metrics(model: MatrixFactorization, val: Validation, k: int) -> tuple[float, float]:
    """Recall@K = hits / min(|relevant|, K) and NDCG@K against min(|relevant|, K) ideal hits.

    The definitions LensKit uses with a cutoff and the EASE / Mult-VAE papers use; `evaluate`
    computes the same figures in SQL from its own lists (a test holds them equal).
    """
    n_items = model.shape.n_items
    device = val.rank_users.device
    all_items = torch.arange(n_items, device=device)
    discounts = 1.0 / torch.log2(torch.arange(2, k + 2, device=device, dtype=torch.float64))
    ideal = torch.cumsum(discounts, 0)
    recall_sum = ndcg_sum = 0.0
    counted = 0
    chunk = max(1, (1 << 24) // n_items)
    n_train = val.train_items.indptr[1:] - val.train_items.indptr[:-1]
    for start in range(0, val.rank_users.numel(), chunk):
        users = val.rank_users[start : start + chunk]
        scores = model.item_logits(users, all_items).float()
        if val.untrained_items is not None:
            scores[:, val.untrained_items] = -math.inf
        rows, cols = val.train_items.rows_of(users)
        scores[rows, cols] = -math.inf
        top = torch.topk(scores, min(k, n_items), dim=1)
        items = top.indices
        # Nothing left to offer (-inf) is not a recommendation.
        offered = torch.isfinite(top.values)
        cold = n_train[users] == 0
        if val.popular is not None and bool(cold.any()):
            fallback = val.popular[: items.shape[1]]
            items[cold] = fallback
            offered[cold] = True if val.untrained_items is None else ~val.untrained_items[fallback]
        relevant = torch.zeros_like(scores, dtype=torch.bool)
        rows, cols = val.val_items.rows_of(users)
        relevant[rows, cols] = True
        n_rel = relevant.sum(1)
        keep = n_rel > 0
        hits = (relevant.gather(1, items) & offered).double()
        capped = n_rel.clamp(max=k)
        recall_sum += float((hits.sum(1)[keep] / capped[keep]).sum())
        dcg = (hits * discounts[: hits.shape[1]]).sum(1)
        idcg = ideal[(capped - 1).clamp(min=0)]
        ndcg_sum += float((dcg[keep] / idcg[keep]).sum())
        counted += int(keep.sum())
    return recall_sum / max(counted, 1), ndcg_sum / max(counted, 1)


def score_of(metrics: Metrics, objective: str) -> float:
    """Higher is better: -RMSE for the rating objective, Recall@K for the ranking ones."""
    if metrics.rmse is not None and (objective == "rating" or metrics.recall is None):
        return -metrics.rmse
    return metrics.recall if metrics.recall is not None else -math.inf


# A validation curve that ends this far (relative) below its best, at least
# `DECAY_CHECKS` validations after it, while the training loss kept falling, is the
# symptom of a loss that no longer tracks the ranking (an over-regularised or biased
# estimate, e.g. a sampled softmax with too few negatives: issue 23's 9.7k-item set
# peaked at epoch 15 and fell 18% by epoch 80).
DECAY_SHARE = 0.05
DECAY_CHECKS = 3


def decay_warning(curve: list[tuple[int, float, float | None]], metric: str) -> str | None:
    """One line when the validation figure rose, then decayed while the loss fell.

    `curve`: (epoch, train loss, validation figure or None where not validated), in
    epoch order; `metric` names the figure. None when the curve is healthy."""
    checked = [(e, loss, v) for e, loss, v in curve if v is not None and math.isfinite(v)]
    if len(checked) < DECAY_CHECKS + 1:
        return None
    best = max(range(len(checked)), key=lambda i: checked[i][2])
    best_epoch, best_loss, best_value = checked[best]
    last_epoch, last_loss, last_value = checked[-1]
    after = len(checked) - 1 - best
    if best == 0 or after < DECAY_CHECKS or best_value <= 0.0:
        return None
    fell = (best_value - last_value) / best_value
    if fell < DECAY_SHARE or not last_loss < best_loss:
        return None
    return (
        f"validation {metric} peaked at epoch {best_epoch} ({best_value:.4f}) and fell "
        f"{fell:.0%} to {last_value:.4f} by epoch {last_epoch} while the training loss kept "
        "falling: the loss no longer tracks the ranking (best epoch kept; see docs/model.md, "
        '"Full or sampled")'
    )
