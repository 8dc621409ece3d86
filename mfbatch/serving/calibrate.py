"""The fold-in half-life a run calibrates on its own users, after the user solve.

A trained user's vector is training's (at `recency_half_life`) moved part of the way by the
user solve (10 epochs at the sharper `user_half_life`); fold-in solves a new user from
scratch in two steps. No single one of the two half-lives makes a folded-in user rank as
the run's own users do: on ML-100K the run's users are matched best at 0.15, on ML-1M
partial at 0.075 (docs/model.md, "Fold-in"). So the run folds a sample of its own trained
users back in at half-lives between the two and keeps the one whose lists agree most with
those users' own lists: no held-out rating is read, only the model and its train ratings.
"""

from __future__ import annotations

import numpy as np

from mfbatch.serving.foldin import fold_in, recency_weights

# Users folded back in per candidate half-life, and the candidates between the two ends.
SAMPLE_USERS = 300
CANDIDATES = 5
K = 20
# Scores held at once while ranking ([users x items] float32, ~128 MB), whatever the catalogue.
SCORE_BLOCK = 32 << 20


def candidates(user_half_life: float, recency_half_life: float) -> list[float]:
    """`CANDIDATES` half-lives evenly spaced in log between the solve's and training's."""
    lo, hi = sorted((user_half_life, recency_half_life))
    if lo <= 0.0 or lo == hi:
        return [hi or lo]
    return [float(h) for h in np.geomspace(lo, hi, CANDIDATES)]


def calibrated_half_life(
    users_aug: np.ndarray,
    items_aug_t: np.ndarray,
    ratings: tuple[np.ndarray, np.ndarray, np.ndarray],
    half_lives: list[float],
    *,
    seed: int = 0,
    prior: tuple[float | None, float] = (None, 0.0),
) -> tuple[float, dict[float, float]]:
    """The half-life among `half_lives` at which refolding a sample of trained users
    reproduces their own top-K lists best (mean overlap), and each one's overlap.

    `ratings`: (user, item, time) of every train rating; `users_aug` [n_users, d+2] and
    `items_aug_t` [d+2, n_items] are the run's export tables; `prior`: the (λ, half-life)
    of `foldin.fold_in_prior`, the prior score's fold-in gives each user.
    """
    users, items, ts = (np.asarray(a) for a in ratings)
    n_items = items_aug_t.shape[1]
    rated = np.unique(users)
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(rated, min(SAMPLE_USERS, rated.size), replace=False))
    order = np.lexsort((items, users))
    keep = order[np.isin(users[order], picked)]
    u, i, t = users[keep], items[keep], ts[keep]
    row = np.searchsorted(picked, u)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=picked.size))])
    k = min(K, n_items - 1)

    block = max(1, SCORE_BLOCK // n_items)

    def top(vectors: np.ndarray) -> np.ndarray:
        lists = np.empty((len(vectors), k), dtype=np.int64)
        for lo in range(0, len(vectors), block):
            hi = min(lo + block, len(vectors))
            scores = vectors[lo:hi].astype(np.float32) @ items_aug_t
            mine = (row >= lo) & (row < hi)
            scores[row[mine] - lo, i[mine]] = -np.inf  # a list never shows the user's items
            lists[lo:hi] = np.argpartition(-scores, k, axis=1)[:, :k]
        return lists

    own = top(users_aug[picked])
    l2, prior_half_life = prior
    prior_weights = recency_weights(u, t, prior_half_life) if l2 is not None else None
    overlap: dict[float, float] = {}
    for half_life in half_lives:
        weights = recency_weights(u, t, half_life)
        folded = fold_in(
            indptr,
            i,
            np.ones(len(i), np.float32),
            items_aug_t,
            weights=weights,
            frequency_l2=l2,
            prior_weights=prior_weights,
        )
        got = top(folded)
        shared = [
            np.intersect1d(a, b, assume_unique=True).size for a, b in zip(own, got, strict=True)
        ]
        overlap[half_life] = float(np.mean(shared)) / k
    best = max(half_lives, key=lambda h: overlap[h])
    return best, overlap
