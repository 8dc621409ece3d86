"""`DataLoaderFactory`: picks the loader for the config's `data.type` (from the design)."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from mfbatch.config import DataConfig, SplitConfig
from mfbatch.data.base import BaseDataLoader
from mfbatch.errors import ConfigError


class DataLoaderFactory:
    _registry: ClassVar[dict[str, type[BaseDataLoader]]] = {}

    @classmethod
    def register(cls, key: str) -> Callable[[type[BaseDataLoader]], type[BaseDataLoader]]:
        def add(loader: type[BaseDataLoader]) -> type[BaseDataLoader]:
            loader.name = key
            cls._registry[key] = loader
            return loader

        return add

    @classmethod
    def keys(cls) -> list[str]:
        cls._load_builtin()
        return sorted(cls._registry)

    @classmethod
    def create(cls, data: DataConfig, split: SplitConfig) -> BaseDataLoader:
        cls._load_builtin()
        try:
            loader = cls._registry[data.type]
        except KeyError:
            raise ConfigError(
                f"data.type: no loader for {data.type!r}; known: {', '.join(cls.keys())}"
            ) from None
        return loader(data, split)

    @staticmethod
    def _load_builtin() -> None:
        # Importing the loader modules registers them; done lazily to avoid import cycles.
        from mfbatch.data import generic, movielens, synthetic  # noqa: F401
