"""mfbatch: nightly top-K for every user from a matrix-factorization model.

`import mfbatch` gives the Python API (mfbatch.api): keyword-only functions for each stage
that return their summaries; the CLI is a thin layer over the same functions.

The API is loaded on first use (`mfbatch.score`, `from mfbatch import train`), not when
the package is: importing one room (`mfbatch.stages.score`, the serving path) does not
pay for every stage's imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mfbatch.version import __version__

if TYPE_CHECKING:
    from mfbatch.api import (
        append,
        diff,
        evaluate,
        list_runs,
        load,
        preprocess,
        read_lists,
        recommend,
        report,
        score,
        train,
        tune,
    )

__all__ = [
    "__version__",
    "append",
    "diff",
    "evaluate",
    "list_runs",
    "load",
    "preprocess",
    "read_lists",
    "recommend",
    "report",
    "score",
    "train",
    "tune",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mfbatch import api

        return getattr(api, name)
    raise AttributeError(f"module 'mfbatch' has no attribute {name!r}")
