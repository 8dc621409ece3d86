"""`mfbatch score --engine ray`: the plan's users in shards over Ray actors.

The lists are built by the same code as the default engine (`build_lists`, `to_arrow`,
the same rating column) from the same `ListPlan`, so they are identical by construction;
only where they are computed differs:

- The driver loads the plan once (mfbatch.stages.score.load_inputs), folds in users the
  run has not seen, and puts the plan, the raw ids and the model's bytes into the object
  store once. Actors read them from there (numpy arrays zero-copy from shared memory on a
  node), not one copy per task.
- A Ray Data pipeline over shard numbers feeds a pool of actors; each holds one ONNX
  Runtime session of the run's model.onnx (the CUDA provider when the actor was given a
  GPU) and writes each shard's lists as one Parquet part under the run folder (written
  to a temporary name and renamed, so a part is complete or absent).
- Publishing stays one staged DuckDB transaction (mfbatch.stages.score.publish_lists),
  scanning the parts as one Arrow dataset. With --no-publish the parts are the output.

Actors ask for a fraction of a CPU: with a whole CPU each, two actors on two cores left
nothing for the pipeline's own tasks, and it stalled.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from rich.console import Console

from mfbatch import db, workdirs
from mfbatch.config import Config, ScoreConfig, machine_cores
from mfbatch.errors import ConfigError, DatabaseError, InputDataError
from mfbatch.foldin import fold_in, method_for
from mfbatch.history import export_lists
from mfbatch.inference import Scorer
from mfbatch.lists import ListPlan, build_lists, to_arrow, with_rating
from mfbatch.progress import Steps
from mfbatch.stages.score import (
    SPOOL_PREFIX,
    ScoreSummary,
    load_inputs,
    publish_lists,
    refuse_empty_lists,
    remove_stale_spools,
)

DEFAULT_WORKERS = 2
# Users per shard: big enough that an actor's per-task overhead (a Parquet file, a Ray
# task) is small next to the scoring, small enough for several shards per actor so a slow
# actor does not hold up the end.
SHARD_USERS = 50_000
PART = "part-{:05d}.parquet"


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "--engine ray: Ray is not installed; pip install 'mfbatch[ray]' (or use the "
            "default engine)"
        ) from None
    return ray


def shards(n_users: int, workers: int) -> list[tuple[int, int]]:
    """[start, stop) ranges over the plan's users: at least two per worker when possible."""
    count = max(1, min(n_users, max(2 * workers, math.ceil(n_users / SHARD_USERS))))
    edges = np.linspace(0, n_users, count + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges) if b > a]


def _connect(ray: Any, settings: ScoreConfig) -> None:
    if ray.is_initialized():
        return  # a caller's Ray (tests, a notebook, a driver already on a cluster)
    quiet: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
    if settings.ray_address:
        ray.init(address=settings.ray_address, **quiet)
    else:
        ray.init(num_cpus=machine_cores(), **quiet)


class ShardScorer:
    """A Ray actor: one ONNX Runtime session; shard numbers in, Parquet parts out."""

    def __init__(self, refs: list[Any], options: dict[str, Any]) -> None:
        import ray

        # The refs come wrapped in a list so Ray hands them over unresolved and the
        # payload is read here, once per actor, from the object store.
        payload = ray.get(refs[0])
        self.plan: ListPlan = payload["plan"]
        self.user_ids: pa.Array = payload["user_ids"]
        self.item_ids: pa.Array = payload["item_ids"]
        self.options = options
        # The model travels as bytes, so an actor on another node needs no shared disk.
        folder = Path(tempfile.mkdtemp(prefix="mfbatch-ray-model-"))
        model = folder / "model.onnx"
        model.write_bytes(payload["model"])
        provider = "cuda" if options["gpus"] > 0 else options["provider"]
        if provider == "auto":
            provider = "cpu"  # an actor without a GPU share must not grab the node's GPU
        self.scorer = Scorer(model, provider=provider, threads=options["threads"])
        self.batch = options["batch_size"] or self.scorer.auto_batch_size(
            self.scorer.n_items, options["memory_mb"]
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {
            "shard": [],
            "users": [],
            "rows": [],
            "popularity_users": [],
            "empty": [],
            "provider": [],
        }
        for shard, start, stop in zip(batch["shard"], batch["start"], batch["stop"], strict=True):
            rows, popularity, empty = self._score(int(shard), int(start), int(stop))
            out["shard"].append(int(shard))
            out["users"].append(int(stop - start))
            out["rows"].append(rows)
            out["popularity_users"].append(popularity)
            out["empty"].append(empty)
            out["provider"].append(self.scorer.provider)
        return {k: np.asarray(v) for k, v in out.items()}

    def _score(self, shard: int, start: int, stop: int) -> tuple[int, int, int]:
        """Returns (rows, popularity users, first user with an empty list or -1)."""
        plan = dataclasses.replace(self.plan, users=self.plan.users[start:stop])
        tables = []
        popularity = 0
        empty = -1
        for lists in build_lists(self.scorer, plan, self.batch):
            popularity += int((~lists.from_model).sum())
            nothing = lists.empty_users()
            if nothing.size and empty < 0:
                empty = int(nothing[0])
            table = to_arrow(lists, self.user_ids, self.item_ids)
            tables.append(
                with_rating(
                    table, self.options["objective"], self.options["lo"], self.options["hi"]
                )
            )
        table = _plain_ids(pa.concat_tables(tables))
        folder = Path(self.options["parts"])
        final = folder / PART.format(shard)
        partial = folder / f".{final.name}.{os.getpid()}.tmp"
        pq.write_table(table, partial)
        os.replace(partial, final)
        return table.num_rows, popularity, empty


def _plain_ids(table: pa.Table) -> pa.Table:
    """Ids as plain strings: a dictionary column would carry every user id into each part."""
    for name in ("user_id", "item_id", "source"):
        index = table.schema.get_field_index(name)
        column = table.column(name)
        if pa.types.is_dictionary(column.type):
            table = table.set_column(index, name, column.cast(column.type.value_type))
    return table


def score_with_ray(*, config: Config, console: Console | None = None) -> ScoreSummary:
    """Score in shards on Ray, write Parquet parts, publish them in one transaction."""
    ray = _ray()
    started = time.perf_counter()
    settings = config.score
    if settings.publish:
        db.check_writable(config.db)
    remove_stale_spools(config.db.parent)
    inputs = load_inputs(config)
    run = inputs.run
    plan = inputs.plan
    fold_started = time.perf_counter()
    if len(inputs.fold_users):
        # Solved once on the driver (small: only users with ratings the run has not seen).
        frozen = Scorer(run.model_path, provider="cpu", threads=1).items_aug_t
        folded_rows = fold_in(
            inputs.fold_indptr,
            inputs.fold_items,
            inputs.fold_ratings,
            frozen,
            method=method_for(run.objective),
            usable=inputs.item_usable,
        )
        plan = dataclasses.replace(plan, folded_rows=folded_rows)
    fold_seconds = time.perf_counter() - fold_started
    workers = settings.workers or DEFAULT_WORKERS
    gpus = float(settings.gpus_per_worker or 0.0)
    created = datetime.now(timezone.utc).replace(tzinfo=None)

    spool: Path | None = None
    try:
        if settings.parts_dir is not None:
            parts = settings.parts_dir
            if parts.exists() and any(parts.iterdir()):
                raise ConfigError(f"--parts-dir: {parts} is not empty; pass a new or empty folder")
            parts.mkdir(parents=True, exist_ok=True)
        else:
            spool = workdirs.make(config.db.parent, SPOOL_PREFIX)
            parts = spool / "parts"
            parts.mkdir()
    except OSError as exc:
        raise DatabaseError(
            f"could not create the Parquet parts folder ({exc}); free space or make the "
            "folder writable; the previous recommendations are unchanged"
        ) from None
    try:
        _connect(ray, settings)
        ranges = shards(len(plan.users), workers)
        if not ranges:
            raise InputDataError("no users to score")
        cores = max(1.0, float(ray.cluster_resources().get("CPU", machine_cores())))
        payload = ray.put(
            {
                "plan": plan,
                "user_ids": inputs.user_ids,
                "item_ids": inputs.item_ids,
                "model": run.model_path.read_bytes(),
            }
        )
        options = {
            "provider": settings.provider,
            "threads": settings.threads or max(1, int(cores // workers)),
            "batch_size": settings.batch_size,
            "memory_mb": settings.memory_mb,
            "objective": run.objective,
            "lo": inputs.dataset.rating_min,
            "hi": inputs.dataset.rating_max,
            "gpus": gpus,
            "parts": str(parts.resolve()),
        }
        if console:
            console.print(
                f"serving run {run.run_id} on Ray: {len(ranges)} shards over {workers} "
                f"actor(s){f', {gpus:g} GPU each' if gpus else ''}",
                highlight=False,
                soft_wrap=True,
            )
        results = _run_pipeline(ray, ranges, payload, options, workers, cores, console)
        refuse_empty_lists([int(e) for e in results["empty"] if e >= 0], inputs.user_ids)
        publish_id = 0
        if settings.publish:
            dataset = pads.dataset(sorted(str(p) for p in parts.glob("part-*.parquet")))
            publish_id = publish_lists(
                config.db,
                dataset,
                run.run_id,
                created,
                partial=settings.users is not None,
                keep=settings.keep_history,
            )
    except OSError as exc:
        raise DatabaseError(
            f"writing recommendations beside {config.db} failed ({exc}); free space and retry; "
            "the previous recommendations are unchanged"
        ) from None
    finally:
        if spool is not None:
            shutil.rmtree(spool, ignore_errors=True)
    written = None
    if settings.output is not None and settings.publish:
        written, _ = export_lists(db_path=config.db, out=settings.output)
    providers = sorted({str(p) for p in results["provider"]})
    return ScoreSummary(
        run_id=run.run_id,
        data_seen=run.data_seen,
        provider=f"{'/'.join(providers)} x {workers} Ray actors",
        users=len(plan.users),
        popularity_users=int(results["popularity_users"].sum()),
        rows=int(results["rows"].sum()),
        partial=settings.users is not None,
        seconds=time.perf_counter() - started,
        db=config.db,
        publish_id=publish_id,
        output=written if written is not None else settings.parts_dir,
        folded_users=len(inputs.fold_users),
        fold_seconds=fold_seconds,
        unscorable_items=inputs.unscorable_items,
    )


def _run_pipeline(
    ray: Any,
    ranges: list[tuple[int, int]],
    payload: Any,
    options: dict[str, Any],
    workers: int,
    cores: float,
    console: Console | None,
) -> dict[str, np.ndarray]:
    import ray.data

    # Ray Data logs each execution at INFO on stderr; the summary line says what ran.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    items = [{"shard": i, "start": a, "stop": b} for i, (a, b) in enumerate(ranges)]
    # One block per shard, so the shards spread over the actors instead of one block
    # (and so one actor) taking them all.
    shards_ds = ray.data.from_items(items, override_num_blocks=len(items))
    scored = shards_ds.map_batches(
        ShardScorer,
        fn_constructor_args=([payload], options),
        batch_size=1,
        batch_format="numpy",
        concurrency=workers,
        # A fraction of the cores: leaves room for Ray Data's own tasks (see the docstring).
        num_cpus=min(1.0, cores / (workers + 1)),
        num_gpus=options["gpus"] or None,
    )
    collected: dict[str, list[Any]] = {}
    with Steps(console, "score", int(sum(b - a for a, b in ranges)), "users") as progress:
        for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
            for key, values in batch.items():
                collected.setdefault(key, []).extend(values.tolist())
            progress.advance(int(np.sum(batch["users"])))
    return {k: np.asarray(v) for k, v in collected.items()}
