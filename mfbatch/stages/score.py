"""Stage 3, `mfbatch score` (serving): top-K unrated items for every user into DuckDB.

Serves the *serving model*: by default the newest refit on all ratings, else the newest
validated run (the summary says which). Whatever run it serves, no list ever holds an
item the user rated in any split. Users with no rating that run trained on get the most
popular items they have not rated (`source = 'popularity'`), never an untrained vector.

The database is read at the start (`score_inputs`) and written at the end. In between an
engine (`mfbatch.serving.engines`: in this process, or over Ray actors) scores batches of
users into a scratch folder beside the database; the publish writes those lists into
the history as the next publish (for `--users`, with everyone else's previous rows)
inside one transaction, and the view `recommendations` shows the newest publish. A crash,
Ctrl-C or full disk at any point leaves the previous lists served.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from mfbatch.artifact.parts import load_item_table
from mfbatch.errors import DatabaseError
from mfbatch.serving.engines import (
    EngineResult,
    ScoreJob,
    apply_fold_in,
    empty_lists_note,
    score_in_process,
)
from mfbatch.serving.spool import SPOOL_PREFIX
from mfbatch.stages.score_inputs import ScoreInputs, load_inputs
from mfbatch.store import outputs, workdirs
from mfbatch.store.history import (
    Scale,
    export_lists,
    list_target,
    publish_lists,
)

if TYPE_CHECKING:  # the serving path imports neither pydantic nor rich to run
    from rich.console import Console

    from mfbatch.config import Config, ScoreConfig


@dataclass(frozen=True)
class ScoreSummary:
    run_id: str
    data_seen: str
    provider: str
    users: int
    popularity_users: int
    rows: int
    partial: bool
    seconds: float
    db: Path
    publish_id: int
    output: Path | None = None
    folded_users: int = 0
    fold_seconds: float = 0.0
    unscorable_items: int = 0
    empty_note: str = ""  # users left with an empty list (they rated every item)

    def line(self) -> str:
        rate = self.users / self.seconds if self.seconds else 0.0
        kind = "refit on train+val" if self.data_seen == "train+val" else "validated on train"
        cold = (
            f", {self.popularity_users:,} of them from popularity (no rating the run trained on)"
            if self.popularity_users
            else ""
        )
        how = "updated for these users" if self.partial else "replaced"
        folded = (
            f", {self.folded_users:,} folded in (ratings the run has not seen; "
            f"{self.fold_seconds:.2f} s)"
            if self.folded_users
            else ""
        )
        unscorable = (
            f"; {self.unscorable_items:,} items the run can't score left out"
            if self.unscorable_items
            else ""
        )
        return (
            f"scored {self.users:,} users with run {self.run_id} ({kind}) on {self.provider}"
            f"{cold}{folded}: {self.rows:,} recommendations, {rate:,.0f} users/s, "
            f"{self.seconds:.2f} s -> {self.db} (recommendations {how}, publish "
            f"{self.publish_id})"
            + (f" and {self.output}" if self.output else "")
            + unscorable
            + (f"; {self.empty_note}" if self.empty_note else "")
        )


def _job(config: Config, inputs: ScoreInputs) -> tuple[ScoreJob, float]:
    """The engine's job, with fold-in solved; and the seconds fold-in took."""
    settings, run = config.score, inputs.run
    started = time.perf_counter()
    plan = apply_fold_in(inputs.plan, inputs.fold, load_item_table(run.model_path), run.objective)
    job = ScoreJob(
        plan=plan,
        model_path=run.model_path,
        run_id=run.run_id,
        run_kind="validated on train, no refit yet" if run.validated else "refit on train+val",
        user_ids=inputs.user_ids,
        item_ids=inputs.item_ids,
        objective=run.objective,
        rating_range=(inputs.dataset.rating_min, inputs.dataset.rating_max),
        provider=settings.provider,
        threads=settings.threads,
        batch_size=settings.batch_size,
        memory_mb=settings.memory_mb,
    )
    return job, time.perf_counter() - started


@contextmanager
def _scratch(config: Config) -> Iterator[Path]:
    """The folder an engine writes into: an owned spool beside the database (removed
    afterwards), or the Ray engine's --parts-dir (kept)."""
    settings = config.score
    spool: Path | None = None
    try:
        if settings.parts_dir is not None:
            parts = settings.parts_dir
            parts.mkdir(parents=True, exist_ok=True)
        else:
            spool = workdirs.make(config.db.parent, SPOOL_PREFIX)
            parts = spool / "parts"
            parts.mkdir()
    except OSError as exc:
        raise DatabaseError(
            f"could not create the scoring spool beside {config.db} ({exc}); free space or "
            "make the folder writable; the previous recommendations are unchanged"
        ) from None
    try:
        yield parts
    finally:
        if spool is not None:
            shutil.rmtree(spool, ignore_errors=True)


def _run_engine(
    settings: ScoreConfig, job: ScoreJob, folder: Path, console: Console | None
) -> EngineResult:
    if settings.engine == "ray":
        from mfbatch.serving.ray_engine import RayOptions, score_on_ray

        options = RayOptions(
            address=settings.ray_address,
            workers=settings.workers or RayOptions.workers,
            gpus_per_worker=float(settings.gpus_per_worker or 0.0),
        )
        return score_on_ray(job, folder, options, console)
    return score_in_process(job, folder, console)


def score(*, config: Config, console: Console | None = None) -> ScoreSummary:
    """Score with the chosen engine, then publish `recommendations` in one transaction."""
    started = time.perf_counter()
    settings = config.score
    # Output paths are refused before any work: a bad one must not cost a night's scoring,
    # nor be found only after the publish.
    target = (
        list_target(settings.output, db_path=config.db, export_dir=config.train.export_dir)
        if settings.output is not None
        else None
    )
    if settings.parts_dir is not None:
        outputs.check(
            settings.parts_dir,
            flag="--parts-dir",
            kind="parts",
            db_path=config.db,
            export_dir=config.train.export_dir,
        )
    # Publishing needs the write lock: a locked or read-only database is refused as the
    # inputs are read, before any scoring.
    inputs = load_inputs(config, writable=settings.publish)
    workdirs.remove_stale(config.db.parent, SPOOL_PREFIX)
    if console:
        for warning in inputs.warnings:
            # The library's console takes no markup: an id in the warning prints as written.
            console.print(f"warning: {warning}", highlight=False)
    job, fold_seconds = _job(config, inputs)
    created = datetime.now(timezone.utc).replace(tzinfo=None)
    publish_id = 0
    with _scratch(config) as folder:
        try:
            result = _run_engine(settings, job, folder, console)
            narrowed = ", ".join(
                flag
                for flag, value in (
                    ("--include-items", settings.include_items),
                    ("--exclude-items", settings.exclude_items),
                    ("--where", settings.where),
                    ("--exclude-where", settings.exclude_where),
                )
                if value is not None
            )
            empty_note = empty_lists_note(result, inputs.user_ids, len(job.plan.users), narrowed)
            if settings.publish:
                publish_id = publish_lists(
                    config.db,
                    result.lists,
                    inputs.run.run_id,
                    created,
                    scale=Scale(job.objective, *job.rating_range),
                    partial=settings.users is not None,
                    keep=settings.keep_history,
                )
        except OSError as exc:
            raise DatabaseError(
                f"writing recommendations beside {config.db} failed ({exc}); free space and "
                "retry; the previous recommendations are unchanged"
            ) from None
    written = settings.parts_dir  # the Ray engine's parts, when kept
    if target is not None and settings.publish:
        written, _ = export_lists(db_path=config.db, out=target)
    return ScoreSummary(
        run_id=inputs.run.run_id,
        data_seen=inputs.run.data_seen,
        provider=result.provider,
        users=len(job.plan.users),
        popularity_users=result.popularity_users,
        rows=result.rows,
        partial=settings.users is not None,
        seconds=time.perf_counter() - started,
        db=config.db,
        publish_id=publish_id,
        output=written,
        folded_users=len(inputs.fold.users),
        fold_seconds=fold_seconds,
        unscorable_items=inputs.unscorable_items,
        empty_note=empty_note,
    )
