"""The loader contract: `BaseDataLoader` (from the design) and the frames it passes on.

A loader's `load_data()` reads its source into a `RawData` with one canonical ratings
frame; `preprocess_data()` turns that into the `PreparedData` the DuckDB tables are made
from. Every loader shares the preprocessing (ids, scale, duplicates, split), so a CSV and a
MovieLens archive with the same ratings give the same tables.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from mfbatch.config import DataConfig, SplitConfig
from mfbatch.data.frames import PreparedData, PrepStats, RawData, sha256_bytes, sha256_file
from mfbatch.data.transforms import prepare

__all__ = [
    "BaseDataLoader",
    "PrepStats",
    "PreparedData",
    "RawData",
    "sha256_bytes",
    "sha256_file",
]


class BaseDataLoader(ABC):
    """Reads one kind of source. Subclasses register with `mfbatch.data.registry.register`."""

    name: ClassVar[str]

    def __init__(self, data: DataConfig, split: SplitConfig) -> None:
        self.data = data
        self.split = split

    @abstractmethod
    def load_data(self) -> RawData:
        """Read the source into the canonical raw frame, or raise InputDataError."""

    def preprocess_data(self, raw: RawData) -> PreparedData:
        """Map ids, normalise ratings, drop duplicates and split: shared by all loaders."""
        scale = (
            (self.data.rating_min, self.data.rating_max)
            if self.data.rating_min is not None and self.data.rating_max is not None
            else raw.rating_scale
        )
        return prepare(
            raw,
            split=self.split,
            rating_scale=scale,
            weight_transform=self.data.weight_transform,
        )
