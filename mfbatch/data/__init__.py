"""Data loaders: MovieLens releases, generic CSV/Parquet, and a synthetic generator."""

from mfbatch.data.base import BaseDataLoader, PreparedData, RawData
from mfbatch.data.factory import DataLoaderFactory

__all__ = ["BaseDataLoader", "DataLoaderFactory", "PreparedData", "RawData"]
