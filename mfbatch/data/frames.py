"""The frames every loader passes on: raw ratings as read, and the prepared tables.

Raw ids stay as the source has them (Int64 when every id is an integer, else String) so
numeric ids map in numeric order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import polars as pl


@dataclass(frozen=True)
class RawData:
    """Ratings as read, before any cleaning."""

    ratings: pl.DataFrame  # user_id, item_id, rating: Float64, ts: Datetime("us") | null
    items: pl.DataFrame | None  # item_id: String, title, genres (metadata, may be None)
    source: str
    source_sha256: str
    loader: str
    layout: str
    rating_scale: tuple[float, float] | None  # known from the release; else inferred
    # No rating column: every row is one positive interaction (rating 1). `ratings` may
    # also hold `weight` (Float64, as read) and, for --split given, `held_out` (Boolean).
    implicit: bool = False


@dataclass(frozen=True)
class PrepStats:
    rows_in: int
    duplicates_dropped: int
    rating_min: float
    rating_max: float
    n_train: int
    n_val: int
    n_val_cold_user: int
    n_val_cold_item: int
    time_cutoff: datetime | None
    implicit: bool = False


@dataclass(frozen=True)
class PreparedData:
    """What goes into DuckDB: the tables of the contract plus the figures for the summary."""

    ratings: pl.DataFrame
    users: pl.DataFrame
    items: pl.DataFrame
    stats: PrepStats


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
