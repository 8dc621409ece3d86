"""Fold-in: a user vector solved at serving time against the model's frozen item tables.

Pure NumPy on arrays, no I/O and no torch: the item tables come from the exported graph
(V_aug_t: rows 0..d-1 = item factors q_i, row d = item bias b_i, row d+1 = ones), so a
folded user row [p_u, 1, c] goes through the same MatMul / masking / TopK as a trained
user's U_aug row [p_u, 1, mu + b_u].

Methods (docs/daily-cycle.md has the measurements that chose the defaults):

- `softmax` (the default for the softmax objectives): their own loss with items frozen,
  maximise sum_{i in R_u} log softmax_j(p.q_j + b_j)_i - l2/2 |p|^2 over the full
  catalogue (concave in p). Ascent steps preconditioned by the Hessian at p = 0, which
  every user shares up to their rating count n_u: (n_u C_0 + l2 I), one eigenbasis for
  all. The first step needs no scores; each further one costs one [users, items] score
  pass. Two steps: at the retrain's quality, 10,000 users in about a second.
- `newton`: the same loss by exact Newton steps from the `wls` solution; its Hessian is
  users x items x d^2 per step (measured: no better than two `softmax` steps, 50x slower).
- `wls`: implicit weighted least squares, the iALS user step. Every item the user rated
  is a 1 with weight 1 + alpha, every other item a 0 with weight 1, ridge l2:
      p = (Q'Q + alpha Q_u'Q_u + l2 I)^-1 (sum_R ((1 + alpha)(1 - b_i) + b_i) q_i - Q'b)
  (targets net of the item bias). Fast, but logits are not 0/1 preferences: it ranks well
  below the model's own loss on a softmax model.
- `ridge` (the default for the rating objective): its own loss with items frozen, least
  squares of the normalised ratings minus b_i on [q_i, 1] (p and the constant c
  together), ridge l2 on p. Its c makes predicted ratings meaningful for a rating model.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Method = Literal["wls", "softmax", "newton", "ridge"]
METHODS: tuple[Method, ...] = ("wls", "softmax", "newton", "ridge")
# Entries of the padded [users, longest, d] gather per chunk: bounds memory (~64 MB).
_CHUNK_ENTRIES = 1 << 24


def item_tables(items_aug_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q [I, d], b [I]) from the graph's V_aug_t [d+2, I]."""
    d = items_aug_t.shape[0] - 2
    return np.ascontiguousarray(items_aug_t[:d].T), np.ascontiguousarray(items_aug_t[d])


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
    alpha: float = 10.0,
    target: float = 1.0,
    steps: int = 2,
    usable: np.ndarray | None = None,
) -> np.ndarray:
    """Rows [F, d+2] float32 for F users given as CSR (indptr [F+1], items, ratings in [0,1]).

    `usable` (bool [I]) drops ratings of items the model can't speak for (never trained);
    a user left with none gets a zero vector, i.e. ranks by item bias alone.
    """
    q, b = item_tables(items_aug_t)
    n_items, d = q.shape
    items = np.asarray(items, dtype=np.int64)
    ratings = np.asarray(ratings, dtype=np.float32)
    keep = items < n_items
    if usable is not None:
        keep &= usable[np.minimum(items, n_items - 1)]
    if not keep.all():
        lengths = _segment_sums(keep, indptr)
        items, ratings = items[keep], ratings[keep]
        indptr = np.concatenate([[0], np.cumsum(lengths)])
    if l2 is None:
        # Measured: softmax on ML-100K strong generalization (README); ridge as the
        # overlap of refolded trained users' lists with their own (tests/test_foldin.py).
        l2 = {"wls": 1.0, "softmax": 10.0, "newton": 10.0, "ridge": 1.0}[method]
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
    gram = (q.T.astype(np.float64) @ q.astype(np.float64)) if method != "ridge" else None
    q_b = (q.T.astype(np.float64) @ b.astype(np.float64)) if method != "ridge" else None
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
        qu = q_pad[idx]  # [B, L, d]
        bu = b_pad[idx]  # [B, L]
        if method == "ridge":
            rows[chunk] = _ridge(qu, bu, r, valid, l2)
        else:
            assert gram is not None and q_b is not None
            if method == "softmax":
                p = _softmax_shared(qu, valid, q, b, l2, steps, shared)
            else:
                p = _wls(qu, bu, valid, gram, q_b, l2, alpha, target)
            if method == "newton":
                p = _softmax_newton(p, qu, valid, q, b, l2, steps)
            rows[chunk, :d] = p
        start += len(chunk)
    return rows


def _segment_sums(values: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    cumulative = np.concatenate([[0], np.cumsum(values, dtype=np.int64)])
    return cumulative[indptr[1:]] - cumulative[indptr[:-1]]


def _wls(
    qu: np.ndarray,
    bu: np.ndarray,
    valid: np.ndarray,
    gram: np.ndarray,
    q_b: np.ndarray,
    l2: float,
    alpha: float,
    target: float,
) -> np.ndarray:
    d = qu.shape[2]
    own = np.matmul(qu.transpose(0, 2, 1), qu).astype(np.float64)  # [B, d, d]; pads are 0
    a = gram[None] + alpha * own + l2 * np.eye(d)[None]
    # Rated: target 1 - b_i at weight 1 + alpha; unrated: target -b_i at weight 1.
    weight = np.where(valid, (1.0 + alpha) * (target - bu) + bu, 0.0)
    rhs = np.einsum("bl,bld->bd", weight, qu).astype(np.float64) - q_b[None]
    return np.linalg.solve(a, rhs[..., None])[..., 0].astype(np.float32)


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
    valid: np.ndarray,
    q: np.ndarray,
    b: np.ndarray,
    l2: float,
    steps: int,
    shared: tuple[np.ndarray, ...] | None,
) -> np.ndarray:
    """Ascent on the full-softmax log-likelihood, each step preconditioned by the Hessian
    at p = 0. The first step needs no scores (the gradient at 0 is sum_R q_i - n m_0): a
    closed form; further steps pay one [B, I] score pass each."""
    assert shared is not None
    mean0, values, vectors = shared
    n = valid.sum(1).astype(np.float64)
    positives = qu.sum(1).astype(np.float64)
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


def _softmax_newton(
    p: np.ndarray,
    qu: np.ndarray,
    valid: np.ndarray,
    q: np.ndarray,
    b: np.ndarray,
    l2: float,
    steps: int,
) -> np.ndarray:
    n = valid.sum(1).astype(np.float64)  # [B]
    positives = qu.sum(1).astype(np.float64)  # [B, d]: sum of the rated items' q
    n_items, d = q.shape
    q64 = q.astype(np.float64)
    p64 = p.astype(np.float64)
    # The Hessian's E_pi[q q'] is [users, items, d] wide before the sum: a few users at a time.
    step = max(1, (1 << 22) // (n_items * d))
    for lo in range(0, len(p64), step):
        sl = slice(lo, lo + step)
        for _ in range(steps):
            logits = p64[sl] @ q64.T + b[None]
            logits -= logits.max(1, keepdims=True)
            pi = np.exp(logits)
            pi /= pi.sum(1, keepdims=True)
            mean = pi @ q64  # [B, d]
            grad = positives[sl] - n[sl, None] * mean - l2 * p64[sl]
            # E_pi[q q'] per user as one batched GEMM ([B, d, I] @ [I, d]), not an einsum.
            second = np.matmul((pi[:, :, None] * q64[None]).transpose(0, 2, 1), q64)
            cov = second - mean[:, :, None] * mean[:, None, :]
            hess = n[sl, None, None] * cov + l2 * np.eye(d)[None]
            p64[sl] = p64[sl] + np.linalg.solve(hess, grad[..., None])[..., 0]
    return p64.astype(np.float32)


def _ridge(
    qu: np.ndarray, bu: np.ndarray, r: np.ndarray, valid: np.ndarray, l2: float
) -> np.ndarray:
    """[B, d+2] rows [p, 1, c] from least squares of (r - b_i) on [q_i, 1]."""
    batch, _, d = qu.shape
    x = np.concatenate([qu, valid[..., None].astype(qu.dtype)], axis=2).astype(np.float64)
    y = np.where(valid, r - bu, 0.0).astype(np.float64)
    a = np.matmul(x.transpose(0, 2, 1), x)
    penalty = np.full(d + 1, l2)
    penalty[d] = 1e-3 * l2  # c: the user's offset, barely shrunk
    a += np.diag(penalty)[None]
    coef = np.linalg.solve(a, np.einsum("bl,blk->bk", y, x)[..., None])[..., 0]
    rows = np.empty((batch, d + 2), dtype=np.float32)
    rows[:, :d] = coef[:, :d]
    rows[:, d] = 1.0
    rows[:, d + 1] = coef[:, d]
    return rows
