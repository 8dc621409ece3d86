"""Fold-in: a user vector solved at serving time against the model's frozen item tables.

Pure NumPy on arrays, no I/O and no torch: the item tables come from the exported graph
(V_aug_t: rows 0..d-1 = item factors q_i, row d = item bias b_i, row d+1 = ones), so a
folded user row [p_u, 1, c] goes through the same MatMul / masking / TopK as a trained
user's U_aug row [p_u, 1, mu + b_u].

Methods (docs/daily-cycle.md has the measurements that chose the defaults):

- `softmax` (the default for the softmax objectives): their own loss with items frozen,
  maximise sum_{i in R_u} log softmax_j(p.q_j + b_j)_i - l2_u/2 |p|^2 over the full
  catalogue (concave in p). Ascent steps preconditioned by the Hessian at p = 0, which
  every user shares up to their rating count n_u: (n_u C_0 + l2_u I), one eigenbasis for
  all. The first step needs no scores; each further one costs one [users, items] score
  pass. Two steps: at the retrain's quality, 10,000 users in about a second. The prior
  l2_u is training's frequency-scaled L2 on the user's row where the run records one.
- `ridge` (the default for the rating objective): its own loss with items frozen, least
  squares of the normalised ratings minus b_i on [q_i, 1] (p and the constant c
  together), ridge l2 on p. Its c makes predicted ratings meaningful for a rating model.

Both weigh each rating as training did (`weights`: the recency weights of `recency_weights`,
times a per-interaction weight where the ratings carry one): the softmax term of rating i
counts w_i times, the ridge residual w_i times. Exact Newton steps and the iALS-style
weighted least squares were measured too (docs/model.md) and left out: no better than two
shared-Hessian steps and 50x slower, and well below, respectively.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

Method = Literal["softmax", "ridge"]
METHODS: tuple[Method, ...] = ("softmax", "ridge")
# Entries of the padded [users, longest, d] gather per chunk: bounds memory (~64 MB).
_CHUNK_ENTRIES = 1 << 24


def item_tables(items_aug_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q [I, d], b [I]) from the graph's V_aug_t [d+2, I]."""
    d = items_aug_t.shape[0] - 2
    return np.ascontiguousarray(items_aug_t[:d].T), np.ascontiguousarray(items_aug_t[d])


def fold_in_half_life(train: Mapping[str, Any]) -> float:
    """The recency half-life a new user's ratings are weighted by, from the run's recorded
    `[train]` settings: the one the run calibrated on its own users after the user solve
    (mfbatch.serving.calibrate), else the solve's, else training's; so a folded-in user
    ranks as the run's own users do."""
    if train.get("objective") == "rating":
        return 0.0
    if train.get("fold_in_half_life") is not None:  # calibrated or given (0: unweighted)
        return float(train["fold_in_half_life"])
    return _fitted_half_life(train)


def _fitted_half_life(train: Mapping[str, Any]) -> float:
    """The recency half-life the run's users' rows were last fitted under: the user
    solve's, else training's (0: unweighted)."""
    return float(train.get("user_half_life") or train.get("recency_half_life") or 0.0)


def fold_in_prior(train: Mapping[str, Any]) -> tuple[float | None, float]:
    """(λ, half-life) of the prior a new user's vector gets, from the run's recorded
    `[train]` settings: training's frequency-scaled L2 and the recency half-life its users'
    rows were last fitted under (the user solve's, else training's); (None, 0) where
    training put no frequency L2 on its users (the rating objective, `--l2-mode plain`)."""
    l2 = train.get("l2")
    if (
        train.get("objective") == "rating"
        or train.get("l2_mode", "frequency") != "frequency"
        or isinstance(l2, bool)
        or not isinstance(l2, int | float)
        or l2 <= 0
    ):
        return None, 0.0
    return float(l2), _fitted_half_life(train)


def recency_weights(users: np.ndarray, ts: np.ndarray, half_life: float) -> np.ndarray:
    """[R] float32: 2^(-newer / (half_life * n_u)) per rating, mean 1 within each user.

    The serving twin of mfbatch.training.objectives.recency_weights (held equal by a test):
    `newer` counts the user's ratings strictly newer than this one (ties share a weight),
    n_u the user's ratings; 0 is no weighting."""
    users = np.asarray(users, dtype=np.int64)
    n = users.size
    if half_life <= 0.0 or n == 0:
        return np.ones(n, dtype=np.float32)
    # Newest first within user, ties in their given order (the torch version's stable sorts).
    order = np.argsort(-np.asarray(ts, dtype=np.int64), kind="stable")
    order = order[np.argsort(users[order], kind="stable")]
    u, t = users[order], np.asarray(ts, dtype=np.int64)[order]
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = u[1:] != u[:-1]
    new_group = new_user.copy()
    new_group[1:] |= t[1:] != t[:-1]
    position = np.arange(n)
    user_start = np.maximum.accumulate(np.where(new_user, position, 0))
    group_start = np.maximum.accumulate(np.where(new_group, position, 0))
    newer = (group_start - user_start).astype(np.float64)
    _, inverse, counts = np.unique(u, return_inverse=True, return_counts=True)
    raw = np.exp2(-newer / (half_life * counts[inverse]))
    mean = np.bincount(inverse, weights=raw) / counts
    weights = np.empty(n, dtype=np.float32)
    weights[order] = (raw / mean[inverse]).astype(np.float32)
    return weights


def method_for(objective: str) -> Method:
    """The fold-in a serving model gets: its own loss where that is cheap enough."""
    return "ridge" if objective == "rating" else "softmax"


def fold_in(
    indptr: np.ndarray,
    items: np.ndarray,
    ratings: np.ndarray,
    items_aug_t: np.ndarray,
    *,
    method: Method = "softmax",
    l2: float | None = None,
    steps: int = 2,
    usable: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    frequency_l2: float | None = None,
    prior_weights: np.ndarray | None = None,
) -> np.ndarray:
    """Rows [F, d+2] float32 for F users given as CSR (indptr [F+1], items, ratings in [0,1]).

    `usable` (bool [I]) drops ratings of items the model can't speak for (never trained);
    a user left with none gets a zero vector, i.e. ranks by item bias alone. `weights`
    ([R], in the CSR's order) weigh each rating's term as training weighed it.

    The softmax solve's prior is `l2` for every user or, given `frequency_l2`, the one
    training put on a user's row (`_priors`), with `prior_weights` the weights that row
    was last fitted under (default `weights`).
    """
    q, b = item_tables(items_aug_t)
    n_items, d = q.shape
    items = np.asarray(items, dtype=np.int64)
    ratings = np.asarray(ratings, dtype=np.float32)
    weights = (
        np.ones(len(items), dtype=np.float32)
        if weights is None
        else np.asarray(weights, dtype=np.float32)
    )
    counts = _prior_counts(weights, prior_weights, frequency_l2)
    keep = items < n_items
    if usable is not None:
        keep &= usable[np.minimum(items, n_items - 1)]
    if not keep.all():
        lengths = _segment_sums(keep, indptr)
        items, ratings, weights = items[keep], ratings[keep], weights[keep]
        counts = None if counts is None else counts[keep]
        indptr = np.concatenate([[0], np.cumsum(lengths)])
    if l2 is None:
        # Measured: softmax on ML-100K strong generalization (README); ridge as the
        # overlap of refolded trained users' lists with their own (tests/test_foldin.py).
        l2 = {"softmax": 10.0, "ridge": 1.0}[method]
    prior = _priors(indptr, counts, l2)
    n_users = len(indptr) - 1
    rows = np.zeros((n_users, d + 2), dtype=np.float32)
    rows[:, d] = 1.0
    lengths = np.diff(indptr)
    if n_users == 0:
        return rows
    # Users of similar length share a chunk, so padding to the longest wastes little.
    order = np.argsort(lengths, kind="stable")
    q_pad = np.concatenate([q, np.zeros((1, d), dtype=q.dtype)])  # row n_items: padding
    b_pad = np.concatenate([b, np.zeros(1, dtype=b.dtype)])
    shared = _popularity_softmax(q, b) if method == "softmax" else None
    start = 0
    while start < n_users:
        longest = max(int(lengths[order[min(start + 1, n_users) - 1]]), 1)
        # Bounded by the padded gather [B, L, d] and by a [B, I] score pass.
        size = max(1, min(_CHUNK_ENTRIES // (longest * max(d, 1)), _CHUNK_ENTRIES // n_items))
        chunk = order[start : start + size]
        longest = max(int(lengths[chunk].max()), 1)
        # Padded [B, L] item index (padding -> the zero row) and rating.
        offsets = np.arange(longest)[None, :]
        valid = offsets < lengths[chunk][:, None]
        where = np.minimum(indptr[chunk][:, None] + offsets, max(len(items) - 1, 0))
        idx = np.where(valid, items[where] if len(items) else n_items, n_items)
        r = np.where(valid, ratings[where] if len(items) else 0.0, 0.0).astype(np.float32)
        w = np.where(valid, weights[where] if len(items) else 0.0, 0.0).astype(np.float32)
        qu = q_pad[idx]  # [B, L, d]
        bu = b_pad[idx]  # [B, L]
        if method == "ridge":
            rows[chunk] = _ridge(qu, bu, r, w, l2)
        else:
            rows[chunk, :d] = _softmax_shared(qu, w, q, b, prior[chunk], steps, shared)
        start += len(chunk)
    return rows


def _prior_counts(
    weights: np.ndarray, prior_weights: np.ndarray | None, frequency_l2: float | None
) -> np.ndarray | None:
    """[R] each rating's part of training's frequency-scaled prior, 2 λ w_i² (`_priors`),
    w the prior's own weights where given; None without a frequency prior."""
    if frequency_l2 is None:
        return None
    shares = weights if prior_weights is None else prior_weights
    return 2.0 * frequency_l2 * np.square(shares, dtype=np.float32)


def _priors(indptr: np.ndarray, counts: np.ndarray | None, l2: float) -> np.ndarray:
    """[F] float64, each user's prior: `l2`, or the sum of the user's `counts`.

    Training's L2 on a user's row is λ Σ w_i² against its per-rating loss (w: the weights
    the row was last fitted under, the user solve's recency weights), so 2 λ Σ w_i² against
    fold-in's half-scaled one: `counts` holds 2 λ w_i² per rating. Training's user
    exponent (a per-user constant on the data term, 0.075 by default) is left out. Against
    the constant 10 on ML-100K strong generalization: 0.98x / 0.99x of a retrain where the
    constant, after the user exponent moved to 0.075, fell to 0.96x / 0.94x (docs/model.md,
    "Fold-in").
    """
    constant = np.full(len(indptr) - 1, l2, dtype=np.float64)
    if counts is None:
        return constant
    counted = _segment_sums(counts, indptr, np.float64)
    # A user with no usable rating keeps the constant: a zero prior and no data is 0/0.
    return np.where(counted > 0.0, counted, constant)


def _segment_sums(values: np.ndarray, indptr: np.ndarray, dtype: type = np.int64) -> np.ndarray:
    cumulative = np.concatenate([[0], np.cumsum(values, dtype=dtype)])
    return cumulative[indptr[1:]] - cumulative[indptr[:-1]]


def _popularity_softmax(q: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, ...]:
    """The softmax at p = 0 (pi_0 = softmax(b)), shared by every user: its mean m_0 and
    the eigenbasis of its covariance C_0, so (n C_0 + l2 I)^-1 is a diagonal per user."""
    q64, b64 = q.astype(np.float64), b.astype(np.float64)
    pi = np.exp(b64 - b64.max())
    pi /= pi.sum()
    mean = pi @ q64
    cov = (q64 * pi[:, None]).T @ q64 - np.outer(mean, mean)
    values, vectors = np.linalg.eigh(cov)
    return mean, np.maximum(values, 0.0), vectors


def _softmax_shared(
    qu: np.ndarray,
    w: np.ndarray,
    q: np.ndarray,
    b: np.ndarray,
    l2: np.ndarray,
    steps: int,
    shared: tuple[np.ndarray, ...] | None,
) -> np.ndarray:
    """Ascent on the weighted full-softmax log-likelihood sum_R w_i log pi_i - l2/2 |p|^2
    (`l2` [B]: one prior per user), each step preconditioned by the Hessian at p = 0,
    (W C_0 + l2 I) with W = sum_R w_i.
    The first step needs no scores (the gradient at 0 is sum_R w_i q_i - W m_0): a closed
    form; further steps pay one [B, I] score pass each. `w` is 0 on padding."""
    assert shared is not None
    mean0, values, vectors = shared
    n = w.sum(1).astype(np.float64)
    positives = np.einsum("bl,bld->bd", w, qu).astype(np.float64)
    l2 = l2[:, None]  # one prior per user
    scale = 1.0 / (n[:, None] * values[None] + l2)  # [B, d] in the eigenbasis
    p = np.zeros_like(positives)
    grad = positives - n[:, None] * mean0
    for step in range(max(steps, 1)):
        if step:
            logits = p.astype(np.float32) @ q.T + b[None]
            logits -= logits.max(1, keepdims=True)
            pi = np.exp(logits)
            pi /= pi.sum(1, keepdims=True)
            grad = positives - n[:, None] * (pi @ q).astype(np.float64) - l2 * p
        p = p + ((grad @ vectors) * scale) @ vectors.T
    return p.astype(np.float32)


def _ridge(qu: np.ndarray, bu: np.ndarray, r: np.ndarray, w: np.ndarray, l2: float) -> np.ndarray:
    """[B, d+2] rows [p, 1, c] from least squares of (r - b_i) on [q_i, 1], residual i
    weighed w_i (0 on padding)."""
    batch, _, d = qu.shape
    valid = w > 0
    x = np.concatenate([qu, valid[..., None].astype(qu.dtype)], axis=2).astype(np.float64)
    y = np.where(valid, r - bu, 0.0).astype(np.float64)
    a = np.matmul(x.transpose(0, 2, 1) * w[:, None, :].astype(np.float64), x)
    penalty = np.full(d + 1, l2)
    penalty[d] = 1e-3 * l2  # c: the user's offset, barely shrunk
    a += np.diag(penalty)[None]
    coef = np.linalg.solve(a, np.einsum("bl,blk->bk", y * w, x)[..., None])[..., 0]
    rows = np.empty((batch, d + 2), dtype=np.float32)
    rows[:, :d] = coef[:, :d]
    rows[:, d] = 1.0
    rows[:, d + 1] = coef[:, d]
    return rows
