"""What tests/test_inference_*.py share: small random models as ONNX graphs, a Scorer on
them, and the numpy oracle every top-K list is checked against.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from hypothesis import HealthCheck, settings

from mfbatch.artifact.graph import build_graph
from mfbatch.serving.csr import SeenItems
from mfbatch.serving.session import Scorer

PROPERTY = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _tables(
    rng: np.random.Generator, n_users: int, n_items: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    users = rng.normal(size=(n_users, width)).astype(np.float32)
    items_t = rng.normal(size=(width, n_items)).astype(np.float32)
    return users, items_t


def _scorer(
    folder: Path, users_aug: np.ndarray, items_aug_t: np.ndarray, graph: str = "split"
) -> Scorer:
    path = folder / "tables.onnx"
    meta = {"n_users": users_aug.shape[0], "n_items": items_aug_t.shape[1]}
    onnx.save_model(build_graph(users_aug, items_aug_t, meta), str(path))
    return Scorer(path, provider="cpu", threads=1, graph=graph)


def _rated(rng: np.random.Generator, n_users: int, n_items: int, below: int) -> list[list[int]]:
    """Per user, a random sorted set of fewer than `below` distinct items."""
    return [
        sorted(rng.choice(n_items, rng.integers(0, below), replace=False).tolist())
        for _ in range(n_users)
    ]


def _seen(per_user: list[list[int]]) -> SeenItems:
    """CSR from per-user item lists, the way score.py builds it from DuckDB (int32 columns)."""
    users = np.array([u for u, items in enumerate(per_user) for _ in items], dtype=np.int32)
    items = np.array([i for row in per_user for i in row], dtype=np.int32)
    return SeenItems.from_sorted(users, items, len(per_user))


def _mask(allowed: list[bool]) -> np.ndarray:
    return np.where(np.array(allowed, dtype=bool), 0.0, -np.inf).astype(np.float32)
