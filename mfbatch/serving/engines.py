"""One contract, two engines: a `ScoreJob` in, an `EngineResult` out.

The score stage reads the database, builds the job (the plan with fold-in applied, the raw
ids, the run's graph) and hands it to an engine: `score_in_process` here, or
`mfbatch.serving.ray_engine.score_on_ray`. Engines never open the database; what they
return is something DuckDB can scan (an Arrow table, or a dataset of Parquet parts), and
the stage publishes it in one transaction.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from mfbatch.errors import ConfigError, InputDataError
from mfbatch.serving.csr import SeenItems
from mfbatch.serving.foldin import fold_in, method_for
from mfbatch.serving.lists import ListPlan, build_lists, to_lean_arrow
from mfbatch.serving.session import Scorer
from mfbatch.serving.spool import SPOOL_FILE, Spooler, read_spool

if TYPE_CHECKING:
    from rich.console import Console

    from mfbatch.progress import Steps


@dataclass(frozen=True)
class FoldIn:
    """Ratings the run has not seen, for the users to solve (ascending user_idx)."""

    users: np.ndarray
    rated: SeenItems  # row r: the items users[r] rated; `ratings` in the same order
    ratings: np.ndarray
    item_usable: np.ndarray  # bool [model n_items]: items the run trained on
    # Per rating, as training weighed it (recency x the ratings' weight column); None: 1.
    weights: np.ndarray | None = None
    temperature: float = 1.0  # the run's softmax temperature: its loss divides logits by it
    # The prior training put on a user's row (foldin.fold_in_prior): its frequency-scaled
    # λ and, per rating, the weights the row was last fitted under; None: the constant.
    frequency_l2: float | None = None
    prior_weights: np.ndarray | None = None


@dataclass(frozen=True)
class ScoreJob:
    """Everything an engine needs, read once by the stage."""

    plan: ListPlan
    model_path: Path
    run_id: str
    run_kind: str  # "refit on train+val" or "validated on train, no refit yet"
    user_ids: pa.Array
    item_ids: pa.Array
    objective: str
    rating_range: tuple[float, float]
    provider: str = "auto"
    threads: int | None = None
    batch_size: int | None = None
    memory_mb: int = 512


@dataclass
class EngineResult:
    rows: int
    popularity_users: int
    provider: str
    lists: Any  # what DuckDB scans at the publish: an Arrow table or a pyarrow dataset
    empty: list[int] = field(default_factory=list)  # users left with nothing (first few)
    empty_users: int = 0  # how many users were left with nothing
    warnings: list[str] = field(default_factory=list)


def apply_fold_in(
    plan: ListPlan, fold: FoldIn, items_aug_t: np.ndarray, objective: str
) -> ListPlan:
    """The plan with a solved vector for each fold-in user, against the frozen item tables."""
    if not len(fold.users):
        return plan
    tables = items_aug_t
    if objective != "rating" and fold.temperature != 1.0:
        # Training's logits were (p.q + b) / T: the same loss solved against q/T, b/T gives
        # the p whose served score p.q + b ranks as the trained users' do.
        tables = items_aug_t.copy()
        tables[:-1] /= fold.temperature
    rows = fold_in(
        fold.rated.indptr,
        fold.rated.indices,
        fold.ratings,
        tables,
        method=method_for(objective),
        usable=fold.item_usable,
        weights=fold.weights,
        frequency_l2=fold.frequency_l2,
        prior_weights=fold.prior_weights,
    )
    return dataclasses.replace(plan, folded_rows=rows)


def empty_lists_note(result: EngineResult, user_ids: pa.Array, n_users: int, narrowed: str) -> str:
    """What the summary says of users left with nothing, or a refusal.

    `narrowed` names the item filters in force (--include-items, --exclude-items, --where,
    --exclude-where), if any: a user left with nothing is then the filters' doing and the
    publish is refused (widen them). Without them, the user rated the whole
    catalogue (an appended heavy rater): they get an empty list, noted in the summary,
    and everyone else is served; only when nobody would get a list is it refused.
    """
    if not result.empty_users:
        return ""
    shown = ", ".join(repr(user_ids[u].as_py()) for u in result.empty[:3])
    if narrowed:
        raise ConfigError(
            f"{result.empty_users:,} user(s) would get an empty list (e.g. user {shown}): "
            f"they rated every item left after {narrowed}; widen the filter; nothing was "
            "published"
        )
    if result.empty_users >= n_users:
        raise ConfigError(
            f"every user would get an empty list (e.g. user {shown}): they rated every item "
            "in the catalogue; nothing was published"
        )
    return (
        f"{result.empty_users:,} user(s) rated every item and have an empty list "
        f"(e.g. user {shown})"
    )


def _steps(console: Console | None, users: int) -> Steps | None:
    """Progress when there is a console to show it on; none (and no rich) when quiet."""
    if console is None:
        return None
    from mfbatch.progress import Steps

    return Steps(console, "score", users, "users")


def score_in_process(job: ScoreJob, spool_dir: Path, console: Console | None) -> EngineResult:
    """Score in this process, spooling each batch's lists to `spool_dir` as it goes."""
    scorer = Scorer(job.model_path, provider=job.provider, threads=job.threads)
    if console:
        for warning in scorer.warnings:
            console.print(f"warning: {warning}", highlight=False)
        console.print(
            f"serving run {job.run_id} ({job.run_kind}) with ONNX Runtime on {scorer.provider}",
            highlight=False,
            soft_wrap=True,
        )
    batch = job.batch_size or scorer.auto_batch_size(scorer.n_items, job.memory_mb)
    spool = spool_dir / SPOOL_FILE
    popularity_users = 0
    empty: list[int] = []
    empty_users = 0
    # The spool is in the history's own integers: the publish copies it without a join.
    spooler = Spooler(spool, to_lean_arrow)
    progress = _steps(console, len(job.plan.users))
    try:
        with progress or contextlib.nullcontext():
            for lists in build_lists(scorer, job.plan, batch):
                nothing = lists.empty_users()
                empty.extend(nothing[: 5 - len(empty)].tolist())
                empty_users += int(nothing.size)
                popularity_users += int((~lists.from_model).sum())
                spooler.put(lists)
                if progress is not None:
                    progress.advance(len(lists.users))
        rows = spooler.close()
    finally:
        spooler.stop()
    if rows is None:
        raise InputDataError("no users to score")
    return EngineResult(
        rows, popularity_users, scorer.provider, read_spool(spool), empty, empty_users
    )
