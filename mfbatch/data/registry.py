"""The loader registry: a loader module registers its class here under a `data.type` key.

Kept apart from `DataLoaderFactory` so loaders import the registry and the factory imports
the loaders: imports run one way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mfbatch.data.base import BaseDataLoader

LOADERS: dict[str, type[BaseDataLoader]] = {}


def register(key: str) -> Callable[[type[BaseDataLoader]], type[BaseDataLoader]]:
    """Class decorator: `@register("csv")` makes the class the loader of `data.type` csv."""

    def add(loader: type[BaseDataLoader]) -> type[BaseDataLoader]:
        loader.name = key
        LOADERS[key] = loader
        return loader

    return add
