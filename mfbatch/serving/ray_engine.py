"""`mfbatch score --engine ray`: the plan's users in shards over Ray actors.

The lists are built by the same code as the default engine (`build_lists`, `to_arrow`,
the same rating column) from the same `ListPlan`, so they are identical by construction;
only where they are computed differs:

- The score stage reads the plan once and folds in users the run has not seen; this
  engine puts the plan, the raw ids and the model's bytes into the object store once.
  Actors read them from there (numpy arrays zero-copy from shared memory on a node), not
  one copy per task.
- A Ray Data pipeline over shard numbers feeds a pool of actors; each holds one ONNX
  Runtime session of the run's model.onnx (the CUDA provider when the actor was given a
  GPU) and writes each shard's lists as one Parquet part under the run folder (written
  to a temporary name and renamed, so a part is complete or absent).
- The engine returns the parts as one Arrow dataset; the stage publishes it in one DuckDB
  transaction (mfbatch.store.history.publish_lists). With --no-publish the parts are the
  output.

Actors ask for a fraction of a CPU: with a whole CPU each, two actors on two cores left
nothing for the pipeline's own tasks, and it stalled.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from rich.console import Console

from mfbatch.config import machine_cores
from mfbatch.errors import ConfigError, InputDataError, first_line
from mfbatch.progress import Steps
from mfbatch.serving.engines import EngineResult, ScoreJob
from mfbatch.serving.lists import ListPlan, build_lists, to_arrow, with_rating
from mfbatch.serving.session import Scorer

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


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local Ray; "auto" or host:port: join one
    workers: int = DEFAULT_WORKERS
    gpus_per_worker: float = 0.0


# How long a cluster's address may take to answer: ray.init alone retries for minutes.
CONNECT_TIMEOUT_S = 5.0


def _reachable(address: str) -> None:
    """HOST:PORT (or ray://HOST:PORT) must accept a connection within seconds."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), CONNECT_TIMEOUT_S):
            pass
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"--ray-address: {address} does not answer ({exc}); start the cluster (`ray "
            "start --head`) or fix the address; nothing was published"
        ) from None


def _connect(ray: Any, address: str | None) -> None:
    if ray.is_initialized():
        return  # a caller's Ray (tests, a notebook, a driver already on a cluster)
    quiet: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False}
    if address and address != "auto":
        _reachable(address)
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(num_cpus=machine_cores(), **quiet)
    except (ConnectionError, RuntimeError, TimeoutError, ValueError) as exc:
        raise ConfigError(
            f"--ray-address: could not join Ray at {address or 'a local Ray'} "
            f"({first_line(exc)}); start the cluster or fix the address"
        ) from None


def _check_resources(ray: Any, settings: RayOptions) -> float:
    """The cluster's CPUs; refuses actors asking for GPUs it lacks (they would wait forever)."""
    resources = ray.cluster_resources()
    gpus = float(resources.get("GPU", 0.0))
    wanted = settings.gpus_per_worker * settings.workers
    if settings.gpus_per_worker > 0 and wanted > gpus + 1e-9:
        raise ConfigError(
            f"--gpus-per-worker: {settings.workers} actor(s) x {settings.gpus_per_worker:g} "
            f"GPU need {wanted:g}, the Ray cluster has {gpus:g}; pass --gpus-per-worker 0 "
            "or fewer --workers"
        )
    return max(1.0, float(resources.get("CPU", machine_cores())))


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
            "empty_users": [],
            "provider": [],
        }
        for shard, start, stop in zip(batch["shard"], batch["start"], batch["stop"], strict=True):
            rows, popularity, empty, empty_users = self._score(int(shard), int(start), int(stop))
            out["shard"].append(int(shard))
            out["users"].append(int(stop - start))
            out["rows"].append(rows)
            out["popularity_users"].append(popularity)
            out["empty"].append(empty)
            out["empty_users"].append(empty_users)
            out["provider"].append(self.scorer.provider)
        return {k: np.asarray(v) for k, v in out.items()}

    def _score(self, shard: int, start: int, stop: int) -> tuple[int, int, int, int]:
        """Returns (rows, popularity users, first user with an empty list or -1, how many
        users have an empty list)."""
        plan = dataclasses.replace(self.plan, users=self.plan.users[start:stop])
        tables = []
        popularity = 0
        empty = -1
        empty_users = 0
        for lists in build_lists(self.scorer, plan, self.batch):
            popularity += int((~lists.from_model).sum())
            nothing = lists.empty_users()
            empty_users += int(nothing.size)
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
        return table.num_rows, popularity, empty, empty_users


def _plain_ids(table: pa.Table) -> pa.Table:
    """Ids as plain strings: a dictionary column would carry every user id into each part."""
    for name in ("user_id", "item_id", "source"):
        index = table.schema.get_field_index(name)
        column = table.column(name)
        if pa.types.is_dictionary(column.type):
            table = table.set_column(index, name, column.cast(column.type.value_type))
    return table


def score_on_ray(
    job: ScoreJob, parts: Path, settings: RayOptions, console: Console | None
) -> EngineResult:
    """Score the job's users in shards on Ray actors; each shard a Parquet part in `parts`."""
    ray = _ray()
    _connect(ray, settings.address)
    ranges = shards(len(job.plan.users), settings.workers)
    if not ranges:
        raise InputDataError("no users to score")
    cores = _check_resources(ray, settings)
    payload = ray.put(
        {
            "plan": job.plan,
            "user_ids": job.user_ids,
            "item_ids": job.item_ids,
            "model": job.model_path.read_bytes(),
        }
    )
    options = {
        "provider": job.provider,
        "threads": job.threads or max(1, int(cores // settings.workers)),
        "batch_size": job.batch_size,
        "memory_mb": job.memory_mb,
        "objective": job.objective,
        "lo": job.rating_range[0],
        "hi": job.rating_range[1],
        "gpus": settings.gpus_per_worker,
        "parts": str(parts.resolve()),
    }
    if console:
        gpus = settings.gpus_per_worker
        console.print(
            f"serving run {job.run_id} on Ray: {len(ranges)} shards over {settings.workers} "
            f"actor(s){f', {gpus:g} GPU each' if gpus else ''}",
            highlight=False,
            soft_wrap=True,
        )
    results = _run_pipeline(ray, ranges, payload, options, settings.workers, cores, console)
    providers = sorted({str(p) for p in results["provider"]})
    return EngineResult(
        rows=int(results["rows"].sum()),
        popularity_users=int(results["popularity_users"].sum()),
        provider=f"{'/'.join(providers)} x {settings.workers} Ray actors",
        lists=pads.dataset(sorted(str(p) for p in parts.glob("part-*.parquet"))),
        empty=[int(e) for e in results["empty"] if e >= 0][:5],
        empty_users=int(results["empty_users"].sum()),
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
