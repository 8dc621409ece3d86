"""The loader contract: `BaseDataLoader` (from the design) and the frames it passes on.

A loader's `load_data()` reads its source into a `RawData` with one canonical ratings
frame; `preprocess_data()` turns that into the `PreparedData` the DuckDB tables are made
from. Every loader shares the preprocessing (ids, scale, duplicates, split), so a CSV and a
MovieLens archive with the same ratings give the same tables.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import ClassVar

import polars as pl

from mfbatch.config import DataConfig, SplitConfig

# The canonical raw ratings frame every loader returns. Raw ids stay as the source has them
# (Int64 when every id is an integer, else String) so numeric ids map in numeric order.
RAW_COLUMNS = ("user_id", "item_id", "rating", "ts")


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


@dataclass(frozen=True)
class PreparedData:
    """What goes into DuckDB: the tables of the contract plus the figures for the summary."""

    ratings: pl.DataFrame
    users: pl.DataFrame
    items: pl.DataFrame
    stats: PrepStats


class BaseDataLoader(ABC):
    """Reads one kind of source. Subclasses register with `DataLoaderFactory`."""

    name: ClassVar[str]

    def __init__(self, data: DataConfig, split: SplitConfig) -> None:
        self.data = data
        self.split = split

    @abstractmethod
    def load_data(self) -> RawData:
        """Read the source into the canonical raw frame, or raise InputDataError."""

    def preprocess_data(self, raw: RawData) -> PreparedData:
        """Map ids, normalise ratings, drop duplicates and split: shared by all loaders."""
        from mfbatch.data.transforms import prepare

        scale = (
            (self.data.rating_min, self.data.rating_max)
            if self.data.rating_min is not None and self.data.rating_max is not None
            else raw.rating_scale
        )
        return prepare(raw, split=self.split, rating_scale=scale)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
