"""`DataLoaderFactory`: picks the loader for the config's `data.type` (from the design)."""

from __future__ import annotations

from collections.abc import Callable

from mfbatch.config import DataConfig, SplitConfig

# Importing the loader modules registers them.
from mfbatch.data import generic, movielens, synthetic  # noqa: F401
from mfbatch.data.base import BaseDataLoader
from mfbatch.data.registry import LOADERS, register
from mfbatch.errors import ConfigError


class DataLoaderFactory:
    """The design's factory: `get_loader(data, split)` returns the registered loader."""

    register: Callable[[str], Callable[[type[BaseDataLoader]], type[BaseDataLoader]]]
    register = staticmethod(register)

    @staticmethod
    def keys() -> list[str]:
        return sorted(LOADERS)

    @staticmethod
    def get_loader(data: DataConfig, split: SplitConfig) -> BaseDataLoader:
        try:
            loader = LOADERS[data.type]
        except KeyError:
            raise ConfigError(
                f"data.type: no loader for {data.type!r}; "
                f"known: {', '.join(DataLoaderFactory.keys())}"
            ) from None
        return loader(data, split)
