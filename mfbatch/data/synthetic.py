"""A seeded generator of realistic ratings, any size, for tests, demos and benchmarks.

What makes it realistic enough to exercise the pipeline and the model:
- low-rank preferences: each user and item has a latent vector; ratings follow
  mu + b_u + b_i + u.v + noise, cut into 1..5 stars with MovieLens-1M's star shares;
- power-law item popularity (Zipf), and popular items rated a little higher;
- per-user activity skew (log-normal counts, a few heavy users);
- which items a user rates leans towards ones they like (so top-K is learnable);
- timestamps: each user active over a span inside a three-year window.
Generation runs in chunks of users, so memory stays bounded at any size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import polars as pl

from mfbatch.data.base import BaseDataLoader, RawData, sha256_bytes
from mfbatch.data.registry import register

_STAR_SHARES = np.array([0.06, 0.11, 0.27, 0.34, 0.22])  # ML-1M's 1..5 star shares
_WINDOW_START = 946_684_800  # 2000-01-01 UTC
_WINDOW_SECONDS = 3 * 365 * 86_400
_CANDIDATES_PER_CHUNK = 4_000_000


@dataclass(frozen=True)
class SyntheticSpec:
    users: int
    items: int
    ratings_per_user: float
    seed: int = 0
    dim: int = 8
    zipf: float = 0.9

    def label(self) -> str:
        return (
            f"synthetic:users={self.users},items={self.items},"
            f"ratings_per_user={self.ratings_per_user:g},seed={self.seed}"
        )


def generate(spec: SyntheticSpec) -> pl.DataFrame:
    """user_id, item_id (1-based Int64), rating (whole stars, Float64), ts (Datetime)."""
    rng = np.random.default_rng(spec.seed)
    n_users, n_items = spec.users, spec.items

    activity = rng.lognormal(0.0, 0.9, n_users)
    counts = np.clip(np.rint(activity / activity.mean() * spec.ratings_per_user), 1, n_items)
    counts = counts.astype(np.int64)

    # Popularity rank is a random permutation so item ids carry no signal.
    popularity = np.empty(n_items)
    popularity[rng.permutation(n_items)] = (np.arange(n_items) + 1.0) ** -spec.zipf
    popularity /= popularity.sum()
    cdf = np.cumsum(popularity)
    cdf[-1] = 1.0
    guide = _guide(cdf)

    scale = spec.dim**-0.5
    user_vec = rng.normal(0.0, 1.0, (n_users, spec.dim)).astype(np.float32)
    item_vec = rng.normal(0.0, 1.0, (n_items, spec.dim)).astype(np.float32)
    log_pop = np.log(popularity)
    item_bias = 0.3 * (log_pop - log_pop.mean()) / (log_pop.std() + 1e-12)
    item_bias += rng.normal(0.0, 0.4, n_items)
    user_bias = rng.normal(0.0, 0.4, n_users)
    start = rng.integers(0, int(_WINDOW_SECONDS * 0.8), n_users)
    span = np.minimum(rng.exponential(120 * 86_400, n_users), _WINDOW_SECONDS - start)

    chunks: list[pl.DataFrame] = []
    first = 0
    while first < n_users:
        budget = np.cumsum(counts[first:] * 3)
        last = first + max(1, int(np.searchsorted(budget, _CANDIDATES_PER_CHUNK)))
        chunks.append(
            _chunk(
                rng,
                first,
                min(last, n_users),
                counts,
                cdf,
                guide,
                user_vec,
                item_vec,
                scale,
                user_bias,
                item_bias,
                start,
                span,
                n_items,
            )
        )
        first = last
    return pl.concat(chunks)


def _guide(cdf: np.ndarray) -> np.ndarray:
    """For bucket j of [0, 1): the first index whose cdf exceeds j / buckets."""
    buckets = min(4 * len(cdf), 1 << 22)
    return np.searchsorted(cdf, np.arange(buckets) / buckets, side="right")


def _draw(cdf: np.ndarray, guide: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Exactly `np.searchsorted(cdf, u, side="right")`, in a third of the time.

    A binary search per draw misses the cache at most steps (3.1 s of 6.7 s for 6M ratings
    over 40,000 items). Instead start from the guide entry two buckets below u (rounding in
    `u * buckets` is off by one at most, so that entry is never past the answer) and step
    forward over the few cdf points in between.
    """
    start = (u * len(guide)).astype(np.int64) - 2
    index = guide[np.maximum(start, 0)]
    behind = np.flatnonzero(cdf[index] <= u)
    while behind.size:
        index[behind] += 1
        behind = behind[cdf[index[behind]] <= u[behind]]
    return index


def _chunk(
    rng: np.random.Generator,
    first: int,
    last: int,
    counts: np.ndarray,
    cdf: np.ndarray,
    guide: np.ndarray,
    user_vec: np.ndarray,
    item_vec: np.ndarray,
    scale: float,
    user_bias: np.ndarray,
    item_bias: np.ndarray,
    start: np.ndarray,
    span: np.ndarray,
    n_items: int,
) -> pl.DataFrame:
    want = counts[first:last]
    users = np.repeat(np.arange(first, last), want * 3)
    items = _draw(cdf, guide, rng.random(users.size))
    affinity = np.einsum("ij,ij->i", user_vec[users], item_vec[items]) * scale
    # Users mostly rate what they like: accept a candidate with probability rising in u.v.
    keep = rng.random(users.size) < 1.0 / (1.0 + np.exp(-3.0 * affinity))
    users, items, affinity = users[keep], items[keep], affinity[keep]
    # Drop repeated (user, item) draws, keeping the first; then cap each user at their count.
    _, first_seen = np.unique(users * n_items + items, return_index=True)
    first_seen.sort()
    users, items, affinity = users[first_seen], items[first_seen], affinity[first_seen]
    starts = np.searchsorted(users, np.arange(first, last))
    position = np.arange(users.size) - starts[users - first]
    keep = position < counts[users]
    users, items, affinity = users[keep], items[keep], affinity[keep]

    score = 3.6 + user_bias[users] + item_bias[items] + affinity + rng.normal(0, 0.5, users.size)
    z = (score - score.mean()) / (score.std() + 1e-12)
    cuts = np.quantile(z, np.cumsum(_STAR_SHARES)[:-1]) if z.size else np.zeros(4)
    stars = 1.0 + np.searchsorted(cuts, z)
    ts = _WINDOW_START + start[users] + (rng.random(users.size) * span[users]).astype(np.int64)
    return pl.DataFrame(
        {
            "user_id": users + 1,
            "item_id": items.astype(np.int64) + 1,
            "rating": stars.astype(np.float64),
            "ts": ts.astype(np.int64),
        }
    ).with_columns(ts=pl.from_epoch("ts", time_unit="s"))


@register("synthetic")
class SyntheticLoader(BaseDataLoader):
    def load_data(self) -> RawData:
        spec = SyntheticSpec(
            users=self.data.users,
            items=self.data.items,
            ratings_per_user=self.data.ratings_per_user,
            seed=self.data.seed,
        )
        return RawData(
            ratings=generate(spec),
            items=None,
            source=spec.label(),
            source_sha256=sha256_bytes(json.dumps(spec.__dict__, sort_keys=True).encode()),
            loader=self.name,
            layout="synthetic",
            rating_scale=(1.0, 5.0),
        )
