"""One contract, two engines: a `ScoreJob` in, an `EngineResult` out.

The score stage reads the database, builds the job (the plan with fold-in applied, the raw
ids, the run's graph) and hands it to an engine: `score_in_process` here, or
`mfbatch.serving.ray_engine.score_on_ray`. Engines never open the database; what they
return is something DuckDB can scan (an Arrow table, or a dataset of Parquet parts), and
the stage publishes it in one transaction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from rich.console import Console

from mfbatch.errors import ConfigError, InputDataError
from mfbatch.progress import Steps
from mfbatch.serving.csr import SeenItems
from mfbatch.serving.foldin import fold_in, method_for
from mfbatch.serving.lists import ListPlan, build_lists, to_arrow, with_rating
from mfbatch.serving.session import Scorer
from mfbatch.serving.spool import SPOOL_FILE, Spooler, read_spool


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
    )
    return dataclasses.replace(plan, folded_rows=rows)


def refuse_empty_lists(empty: list[int], user_ids: pa.Array) -> None:
    """Never publish a user with nothing: every engine's result is checked with this."""
    if empty:
        shown = ", ".join(repr(user_ids[u].as_py()) for u in empty[:5])
        raise ConfigError(
            f"some users would get an empty list (e.g. user {shown}): they rated every "
            "item left after --include-items/--exclude-items; widen the allow list; "
            "nothing was published"
        )


def arrow_lists(job: ScoreJob) -> Any:
    """Batch lists -> the Arrow table every engine publishes (raw ids, rating column)."""
    lo, hi = job.rating_range
    return lambda lists: with_rating(
        to_arrow(lists, job.user_ids, job.item_ids), job.objective, lo, hi
    )


def score_in_process(job: ScoreJob, spool_dir: Path, console: Console | None) -> EngineResult:
    """Score in this process, spooling each batch's lists to `spool_dir` as it goes."""
    scorer = Scorer(job.model_path, provider=job.provider, threads=job.threads)
    if console:
        for warning in scorer.warnings:
            console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
        console.print(
            f"serving run {job.run_id} ({job.run_kind}) with ONNX Runtime on {scorer.provider}",
            highlight=False,
            soft_wrap=True,
        )
    batch = job.batch_size or scorer.auto_batch_size(scorer.n_items, job.memory_mb)
    spool = spool_dir / SPOOL_FILE
    popularity_users = 0
    empty: list[int] = []
    spooler = Spooler(spool, arrow_lists(job))
    try:
        with Steps(console, "score", len(job.plan.users), "users") as progress:
            for lists in build_lists(scorer, job.plan, batch):
                empty.extend(lists.empty_users()[: 5 - len(empty)].tolist())
                popularity_users += int((~lists.from_model).sum())
                spooler.put(lists)
                if lists.empty_users().size and len(empty) >= 5:
                    break
                progress.advance(len(lists.users))
        rows = spooler.close()
    finally:
        spooler.stop()
    if rows is None:
        raise InputDataError("no users to score")
    return EngineResult(rows, popularity_users, scorer.provider, read_spool(spool), empty)
