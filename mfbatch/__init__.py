"""mfbatch: nightly top-K for every user from a matrix-factorization model.

`import mfbatch` gives the Python API (mfbatch.api): keyword-only functions for each stage
that return their summaries; the CLI is a thin layer over the same functions.
"""

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
)
from mfbatch.version import __version__

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
]
