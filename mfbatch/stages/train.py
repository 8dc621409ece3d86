"""Stage 2, `mfbatch train`: DuckDB ratings -> trained model in export/<run_id>/ + run record.

All I/O of training lives here: reading the split, choosing the device, saving weights and
a manifest, recording `training_runs` / `training_epochs`. The loop itself is in trainer.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mfbatch.artifact.files import export_model, save_model
from mfbatch.config import Config, TrainConfig, check_sharding, load_config, recency_for
from mfbatch.errors import ConfigError, DatabaseError, ModelError
from mfbatch.store import db
from mfbatch.store.datasets import Dataset
from mfbatch.store.runs import Run, find_run, stored_export_path
from mfbatch.training import distributed
from mfbatch.training.loop import Csr, EpochRecord, Interactions, Outcome, Validation, train_model
from mfbatch.training.model import MatrixFactorization, ModelShape
from mfbatch.version import __version__


@dataclass(frozen=True)
class TrainSummary:
    run_id: str
    device: str
    status: str
    epochs_run: int
    best_epoch: int
    data_seen: str
    n_train: int
    val: dict[str, float | None]
    seconds: float
    examples_per_second: float
    export_path: Path
    top_k: int

    def line(self) -> str:
        figures = ", ".join(
            f"{name} {value:.4f}" for name, value in self.val.items() if value is not None
        )
        return (
            f"trained {self.run_id} on {self.device}: {self.status}, best epoch "
            f"{self.best_epoch}/{self.epochs_run}"
            + (f", val {figures}" if figures else "")
            + f"; {self.n_train:,} rows ({self.data_seen}), "
            f"{self.examples_per_second:,.0f} examples/s, {self.seconds:.1f} s "
            f"-> {self.export_path}"
        )


def resolve_device(requested: str) -> torch.device:
    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise ConfigError(
            f"--device cuda: CUDA is not available to torch {torch.__version__}; "
            "use --device cpu or --device auto"
        )
    return torch.device(
        "cuda" if requested == "cuda" or (requested == "auto" and available) else "cpu"
    )


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    n = torch.get_num_threads()
    return f"cpu ({n} thread{'' if n == 1 else 's'})"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def idle_cores(cores: int, window_s: float = 0.2) -> float:
    """How many of the machine's cores sat idle over a short window (/proc/stat)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    try:
        idle_a, total_a = sample()
        time.sleep(window_s)
        idle_b, total_b = sample()
    except (OSError, ValueError, IndexError):
        return float(cores)
    machine = os.cpu_count() or cores
    return machine * (idle_b - idle_a) / max(total_b - total_a, 1)


def resolve_threads(requested: int | None) -> tuple[int, str | None]:
    """(threads, note). Never more than the cores this process may run on; by default
    only the cores that are idle now, because torch's threads wait for each other at
    every op: with one of two cores busy, two threads ran ~9x slower than one
    (README, "The model")."""
    cores = usable_cores()
    if requested is not None:
        if requested > cores:
            return cores, f"--threads {requested}: capped at the {cores} cores available"
        return requested, None
    return max(1, min(cores, math.floor(idle_cores(cores) + 0.5))), None


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def _tensor(array: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # A copy: Arrow-backed arrays are read-only, and torch wants to own its memory.
    tensor = torch.tensor(array, dtype=dtype)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _refit_config(run: Run, config: TrainConfig) -> TrainConfig:
    """The validated run's own settings, so the refit differs from it only in its data."""
    values = {k: v for k, v in run.config["train"].items() if k in TrainConfig.model_fields}
    # Runs recorded before --recency-half-life existed trained without it.
    values.setdefault("recency_half_life", 0.0)
    values.update(on="all", device=config.device, export_dir=config.export_dir, nproc=config.nproc)
    try:
        return load_config(overrides={"train": values}).train
    except ConfigError as exc:
        # The stored settings, not the user's flags: say which run they came from.
        raise ModelError(
            f"the validated run {run.run_id} was trained with settings this version no "
            f"longer takes ({exc}); train a new validated run, then refit"
        ) from None


def train(*, config: Config, console: Console | None = None) -> TrainSummary:
    """Train, save export/<run_id>/, record the run. Raises MfbatchError on bad input.

    `--nproc N` (outside torchrun) starts N-1 worker ranks and trains as rank 0 here.
    """
    nproc = config.train.nproc
    if nproc > 1 and not distributed.from_env().active:
        # Checked once here: workers opening the file for writing at the same time as
        # others read it would trip DuckDB's lock.
        db.check_writable(config.db)
        gpus = torch.cuda.device_count()
        if resolve_device(config.train.device).type == "cuda" and nproc > gpus:
            raise ConfigError(
                f"--nproc: {nproc} processes need one GPU each, this machine has {gpus}; "
                f"pass --nproc {gpus} or --device cpu"
            )
        return distributed.spawn(
            nproc, _rank, (config,), lambda: _train(config=config, console=console, checked=True)
        )
    return _train(config=config, console=console)


def _rank(config: Config) -> None:
    """A worker rank of `--nproc`: trains its shard, prints and records nothing."""
    _train(config=config, console=None, checked=True)


def _train(*, config: Config, console: Console | None, checked: bool = False) -> TrainSummary:
    started_at = datetime.now(timezone.utc).replace(tzinfo=None)
    started = time.perf_counter()
    settings = config.train
    shard = distributed.from_env()
    if shard.active:
        # Under torchrun --nproc may be left at 1: the launcher's world size decides.
        check_sharding(settings.objective, settings.batch_norm, settings.optimizer, shard.world)
    device = shard.device(resolve_device(settings.device))
    distributed.init(shard, device)
    if not shard.main:
        console = None
    # The run is recorded at the end: a locked or unwritable database is refused now,
    # not after the training it would throw away.
    if shard.main and not checked:
        db.check_writable(config.db)
    shard.barrier()
    if device.type == "cpu":
        threads, note = resolve_threads(settings.threads)
        if shard.active and settings.threads is None:
            # Ranks start together and each would count the same idle cores: split them.
            threads = max(1, usable_cores() // shard.world)
        torch.set_num_threads(threads)
        if note and console:
            console.print(f"note: {note}", highlight=False)
    con = db.connect(config.db, read_only=True)
    try:
        dataset = Dataset.load(con, config.db)
        frame = db.frame(con, "training_ratings", all_splits=settings.on == "all")
        parent: str | None = None
        epochs: int | None = None
        if settings.on == "all":
            validated = find_run(con, config.db, dataset, role="measure")
            settings = _refit_config(validated, settings)
            parent, epochs = validated.run_id, max(validated.best_epoch, 1)
    finally:
        con.close()
    recency_note = ""
    if settings.recency_half_life is None:
        # Recorded resolved, so a refit copying this run weights its ratings the same way.
        settings = settings.replace(recency_half_life=recency_for(dataset.split_kind))
        if settings.recency_half_life and settings.objective != "rating":
            # A default that depends on the data deserves a word: say what it is and why.
            recency_note = (
                f", recency half-life {settings.recency_half_life:g} (the default for a "
                f"{dataset.split_kind} split; --recency-half-life 0 turns it off)"
            )
    if console:
        ranks = (
            f" x {shard.world} processes ({'nccl' if device.type == 'cuda' else 'gloo'})"
            if shard.active
            else ""
        )
        console.print(
            f"training on {describe(device)}{ranks}{recency_note}", highlight=False, soft_wrap=True
        )

    is_val = frame["is_val"].to_numpy()
    fit = frame if settings.on == "all" else frame.filter(~pl.col("is_val"))
    if fit.height == 0:
        raise DatabaseError(f"{config.db}: the ratings table has no train rows; run preprocess")
    if settings.on == "train" and not is_val.any():
        raise DatabaseError(
            f"{config.db}: the val split is empty, so nothing can be validated; "
            "preprocess with --val-fraction > 0, or refit with --on all"
        )
    data = Interactions(
        users=_tensor(fit["user_idx"].to_numpy(), device, torch.int64),
        items=_tensor(fit["item_idx"].to_numpy(), device, torch.int64),
        ratings=_tensor(fit["rating_norm"].to_numpy(), device, torch.float32),
        # Without a time for every rating there is no order to weight by recency.
        ts=None
        if fit["ts_ms"].null_count()
        else _tensor(fit["ts_ms"].to_numpy(), device, torch.int64),
    )
    if settings.recency_half_life and data.ts is None and console:
        console.print(
            "note: --recency-half-life: some ratings have no timestamp, so none is weighted "
            "by recency",
            highlight=False,
        )
    n_users, n_items = dataset.n_users, dataset.n_items
    val = None
    if settings.on == "train":
        val = _validation(frame, data, settings, device, dataset)

    torch.manual_seed(settings.seed)
    shape = ModelShape(
        n_users=n_users,
        n_items=n_items,
        dim=int(settings.embedding_dim or 0),
        dropout=settings.dropout,
        batch_norm=settings.batch_norm,
        sparse=settings.optimizer in ("sparse_adam", "adagrad"),
    )
    model = MatrixFactorization(shape).to(device)
    outcome = _fit(model, data, val, settings, epochs, console, shard)
    if console and outcome.plan and outcome.plan.note:
        console.print(f"note: {outcome.plan.note}", highlight=False)

    run_id = shard.from_main(new_run_id())
    export_path = settings.export_dir / run_id
    seconds = time.perf_counter() - started
    fit_seconds = sum(r.seconds for r in outcome.history) or seconds
    if not shard.main:
        # Every rank holds the same weights; only rank 0 exports and records them.
        return _summary(run_id, device, outcome, settings, data, seconds, fit_seconds, export_path)
    manifest = save_model(
        model,
        export_path,
        manifest={
            "run_id": run_id,
            "parent_run_id": parent,
            "dataset_sha256": dataset.sha256,
            "data_seen": "train+val" if settings.on == "all" else "train",
            "shape": dataclasses.asdict(shape),
            "rating_min": dataset.rating_min,
            "rating_max": dataset.rating_max,
            "objective": settings.objective,
            "best_epoch": outcome.best_epoch,
            "status": outcome.status,
            "mfbatch_version": __version__,
            "torch_version": torch.__version__,
            "created_at": datetime.now(timezone.utc).isoformat(),
        },
    )
    export_model(model, manifest, export_path)
    summary = _summary(run_id, device, outcome, settings, data, seconds, fit_seconds, export_path)
    record_run(config, settings, summary, outcome, dataset, parent, started_at)
    if outcome.status == "diverged":
        raise ModelError(
            f"training diverged (loss not finite) in epoch {outcome.diverged_epoch}; the last "
            f"good weights (epoch {outcome.best_epoch}) are in {export_path}; lower --lr "
            "or raise --l2"
        )
    return summary


def _summary(
    run_id: str,
    device: torch.device,
    outcome: Outcome,
    settings: TrainConfig,
    data: Interactions,
    seconds: float,
    fit_seconds: float,
    export_path: Path,
) -> TrainSummary:
    examples = len(data) * max(len(outcome.history), 1)
    best = _best(outcome)
    return TrainSummary(
        run_id=run_id,
        device=device.type,
        status=outcome.status,
        epochs_run=len(outcome.history),
        best_epoch=outcome.best_epoch,
        data_seen="train+val" if settings.on == "all" else "train",
        n_train=len(data),
        val={
            "RMSE": best.metrics.rmse if best and best.metrics else None,
            "MAE": best.metrics.mae if best and best.metrics else None,
            f"Recall@{settings.top_k}": best.metrics.recall if best and best.metrics else None,
            f"NDCG@{settings.top_k}": best.metrics.ndcg if best and best.metrics else None,
        },
        seconds=seconds,
        examples_per_second=examples / fit_seconds,
        export_path=export_path,
        top_k=settings.top_k,
    )


def _validation(
    frame: pl.DataFrame,
    data: Interactions,
    settings: TrainConfig,
    device: torch.device,
    dataset: Dataset,
) -> Validation:
    held = frame.filter(pl.col("is_val"))
    pairs = Interactions(
        users=_tensor(held["user_idx"].to_numpy(), device, torch.int64),
        items=_tensor(held["item_idx"].to_numpy(), device, torch.int64),
        ratings=_tensor(held["rating_norm"].to_numpy(), device, torch.float32),
    )
    popular, untrained = Validation.serving_rules(data.items, dataset.n_items)
    n_users = dataset.n_users
    candidates = np.unique(held["user_idx"].to_numpy())
    if candidates.size > settings.eval_users:
        rng = np.random.default_rng(settings.seed)
        candidates = np.sort(rng.choice(candidates, settings.eval_users, replace=False))
    return Validation(
        pairs=pairs,
        train_items=Csr.build(data.users, data.items, n_users),
        val_items=Csr.build(pairs.users, pairs.items, n_users),
        rank_users=_tensor(candidates, device, torch.int64),
        rating_min=dataset.rating_min,
        rating_max=dataset.rating_max,
        popular=popular,
        untrained_items=untrained,
    )


def _fit(
    model: MatrixFactorization,
    data: Interactions,
    val: Validation | None,
    settings: TrainConfig,
    epochs: int | None,
    console: Console | None,
    shard: distributed.Shard | None = None,
) -> Outcome:
    total_epochs = epochs or settings.epochs
    # Bars on a terminal; in a log (cron, CI, a pipe) one plain line per epoch instead.
    log_lines = console is not None and not console.is_terminal
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        disable=console is None or not console.is_terminal,
    )
    tasks: dict[int, Any] = {}

    def start(epoch: int, n: int) -> Any:
        tasks[epoch] = progress.add_task(f"epoch {epoch}/{total_epochs}", total=n, status="")
        return lambda done: progress.advance(tasks[epoch], done)

    def end(record: EpochRecord) -> None:
        status = f"loss {record.train_loss:.4f}"
        if record.metrics is not None:
            status += f"  val RMSE {record.metrics.rmse:.4f}"
            if record.metrics.recall is not None:
                status += f"  Recall@{settings.top_k} {record.metrics.recall:.4f}"
                status += f"  NDCG@{settings.top_k} {record.metrics.ndcg or 0.0:.4f}"
        progress.update(tasks[record.epoch], status=status)
        if log_lines and console is not None:
            console.print(
                f"epoch {record.epoch}/{total_epochs} {status}  {record.seconds:.2f} s",
                highlight=False,
                soft_wrap=True,
            )

    with progress:
        return train_model(
            model,
            data,
            val,
            settings,
            epochs=epochs,
            # A refit runs the validated run's best epoch count on the schedule that run had.
            schedule_epochs=settings.epochs if epochs is not None else None,
            on_epoch_start=start,
            on_epoch_end=end,
            shard=shard,
        )


def _best(outcome: Outcome) -> EpochRecord | None:
    return next((r for r in outcome.history if r.epoch == outcome.best_epoch), None)


def record_run(
    config: Config,
    settings: TrainConfig,
    summary: TrainSummary,
    outcome: Outcome,
    dataset: Dataset,
    parent: str | None,
    started_at: datetime,
) -> None:
    best = _best(outcome)
    metrics = best.metrics if best else None
    epochs = pl.DataFrame(
        {
            "run_id": [summary.run_id] * len(outcome.history),
            "epoch": [r.epoch for r in outcome.history],
            "train_loss": [r.train_loss for r in outcome.history],
            "val_rmse": [r.metrics.rmse if r.metrics else None for r in outcome.history],
            "val_mae": [r.metrics.mae if r.metrics else None for r in outcome.history],
            "val_recall": [r.metrics.recall if r.metrics else None for r in outcome.history],
            "val_ndcg": [r.metrics.ndcg if r.metrics else None for r in outcome.history],
            "seconds": [r.seconds for r in outcome.history],
        },
        schema_overrides={c: pl.Float64 for c in ("val_rmse", "val_mae", "val_recall", "val_ndcg")},
    )
    resolved = config.model_copy(update={"train": settings}).to_dict()
    con = db.connect(config.db)
    try:
        con.register("staged_epochs", epochs.to_arrow())
        with db.transaction(con, f"training run {summary.run_id} into {config.db}"):
            db.run(con, "create_training_runs")
            db.run(con, "create_training_epochs")
            db.run(
                con,
                "insert_training_run",
                run_id=summary.run_id,
                parent_run_id=parent,
                started_at=started_at,
                finished_at=datetime.now(timezone.utc).replace(tzinfo=None),
                status=outcome.status,
                config=json.dumps(resolved),
                dataset_sha256=dataset.sha256,
                data_seen=summary.data_seen,
                device=summary.device,
                objective=settings.objective,
                epochs_run=summary.epochs_run,
                best_epoch=summary.best_epoch,
                train_loss=best.train_loss if best else None,
                val_rmse=metrics.rmse if metrics else None,
                val_mae=metrics.mae if metrics else None,
                val_recall=metrics.recall if metrics else None,
                val_ndcg=metrics.ndcg if metrics else None,
                top_k=settings.top_k,
                n_train=summary.n_train,
                seconds=summary.seconds,
                examples_per_second=summary.examples_per_second,
                export_path=stored_export_path(summary.export_path, config.db),
            )
            db.run(con, "insert_training_epochs")
    finally:
        con.close()
