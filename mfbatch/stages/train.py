"""Stage 2, `mfbatch train`: DuckDB ratings -> trained model in export/<run_id>/ + run record.

Reading (train_inputs), the loop (mfbatch.training), writing (train_record): this module
only wires them, chooses the device and threads, and says what it is doing.
"""

from __future__ import annotations

import secrets
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mfbatch.artifact.graph import augmented_tables
from mfbatch.config import Config, TrainConfig, check_sharding, with_half_lives
from mfbatch.config.train import L2_BASE, l2_for
from mfbatch.errors import ConfigError, MfbatchError, ModelError, first_line
from mfbatch.serving.calibrate import calibrated_half_life, candidates
from mfbatch.serving.foldin import fold_in_prior
from mfbatch.stages.train_inputs import TrainInputs, interactions, read_inputs
from mfbatch.stages.train_record import TrainSummary, record_run, save_run, summarise
from mfbatch.store import db
from mfbatch.store.datasets import Dataset
from mfbatch.training import distributed
from mfbatch.training.build import interactions_per_item, new_model, plan_for
from mfbatch.training.device import (
    IdleWindow,
    describe,
    resolve_device,
    resolve_threads,
    usable_cores,
)
from mfbatch.training.loop import USER_SOLVE_EPOCHS, EpochRecord, Outcome, train_model
from mfbatch.training.model import MatrixFactorization
from mfbatch.training.steps import Plan, default_epochs
from mfbatch.training.tensors import Interactions
from mfbatch.training.validation import Validation, decay_warning

__all__ = ["TrainSummary", "train"]


def new_run_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


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


def _place(
    config: Config, console: Console | None, checked: bool
) -> tuple[torch.device, distributed.Shard, Console | None]:
    """The device this rank trains on; only the main rank keeps a console."""
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
    return device, shard, console


def _set_threads(
    settings: TrainConfig,
    device: torch.device,
    shard: distributed.Shard,
    console: Console | None,
    window: IdleWindow,
) -> None:
    """The CPU threads to train with: `--threads`, else the cores idle over `window`."""
    if device.type != "cpu":
        return
    threads, note = resolve_threads(settings.threads, window)
    if shard.active and settings.threads is None:
        # Ranks start together and each would count the same idle cores: split them.
        threads = max(1, usable_cores() // shard.world)
    torch.set_num_threads(threads)
    if note and console:
        console.print(f"note: {note}", highlight=False)


def _with_recency(settings: TrainConfig, dataset: Dataset) -> tuple[TrainConfig, str]:
    """The resolved recency and user-solve half-lives (recorded, so a refit copies them),
    and a word on them when they are defaults that depend on the data."""
    given = settings.recency_half_life is not None
    settings = with_half_lives(settings, dataset.split_kind)
    if given or not settings.recency_half_life or settings.objective == "rating":
        return settings, ""
    solve_note = (
        f", then each user solved again at half-life {settings.user_half_life:g}"
        if settings.user_half_life
        else ""
    )
    return settings, (
        f", recency half-life {settings.recency_half_life:g}{solve_note} (the defaults for a "
        f"{dataset.split_kind} split; --recency-half-life 0 turns both off)"
    )


def _with_epochs(
    settings: TrainConfig, data: Interactions, n_items: int
) -> tuple[TrainConfig, str]:
    """The resolved epoch budget and L2 (recorded, so a refit copies them) and a word on
    each default taken from the data's size."""
    notes = []
    if settings.l2 is None:
        per_item = interactions_per_item(data)
        l2 = l2_for(per_item)
        settings = settings.replace(l2=l2)
        if l2 != L2_BASE:
            notes.append(
                f"note: L2 {l2:.3g}, the default for {per_item:.1f} train interactions per "
                "item (sparse data; --l2 to choose)"
            )
    if settings.epochs is None:
        users = _users(data)
        epochs = default_epochs(settings, n_items, users, data.users.device.type)
        settings = settings.replace(epochs=epochs)
        notes.append(
            f"note: {epochs} epochs, the default for {users:,} users with ratings at "
            f"{settings.batch_size} a step (--epochs to choose)"
        )
    return settings, "\n".join(notes)


def _users(data: Interactions) -> int:
    return max(1, int(torch.unique(data.users).numel()))


def _announce(
    console: Console | None, device: torch.device, shard: distributed.Shard, note: str
) -> None:
    if console:
        backend = "nccl" if device.type == "cuda" else "gloo"
        ranks = f" x {shard.world} processes ({backend})" if shard.active else ""
        console.print(
            f"training on {describe(device)}{ranks}{note}", highlight=False, soft_wrap=True
        )


def _train(*, config: Config, console: Console | None, checked: bool = False) -> TrainSummary:
    started_at = datetime.now(timezone.utc).replace(tzinfo=None)
    started = time.perf_counter()
    # Opened first: reading the ratings and building the tensors overlap the 0.2 s the
    # default thread count watches the machine for.
    window = IdleWindow()
    device, shard, console = _place(config, console, checked)
    if device.type == "cpu":
        # Until then one thread: the start-up's tensor work is small, and two threads on
        # a busy machine took 0.3 s for what one does in 0.03 s.
        torch.set_num_threads(1)
    inputs = read_inputs(config)
    settings, note = _with_recency(inputs.settings, inputs.dataset)
    data, val = interactions(inputs, device, config.db)
    _set_threads(config.train, device, shard, console, window)
    _announce(console, device, shard, inputs.tuned + note)
    if (settings.recency_half_life or settings.user_half_life) and data.ts is None and console:
        console.print(
            "note: --recency-half-life / --user-half-life: some ratings have no timestamp, so "
            "none is weighted by recency and users are not solved again",
            highlight=False,
        )
    settings, epochs_note = _with_epochs(settings, data, inputs.dataset.n_items)
    if console and epochs_note:
        console.print(epochs_note, highlight=False)
    model = new_model(inputs.dataset.n_users, inputs.dataset.n_items, settings, device)
    # Chosen and said before the first step: which loss, and the cost figures behind it.
    run_plan = plan_for(model, data, settings)
    if console:
        console.print(f"loss: {run_plan.reason}", highlight=False, soft_wrap=True)
    # A given split's held-out rows are the test set: measured, never chosen on.
    given = inputs.dataset.split_kind == "given"
    if given and console and val is not None:
        console.print(
            "note: given split: the test rows are measured at each validation but never "
            "chosen on (no early stopping; the last epoch is kept)",
            highlight=False,
        )
    outcome = _fit(
        model, data, val, settings, inputs.epochs, console, shard, run_plan, select=not given
    )
    settings = _with_fold_in(settings, model, data, outcome, console)
    warning = _decay(outcome, settings)
    if console and warning:
        console.print(f"warning: {warning}", highlight=False, soft_wrap=True)
    run_id = shard.from_main(new_run_id())
    export_path = settings.export_dir / run_id
    seconds = time.perf_counter() - started
    solved = outcome.solved.seconds if outcome.solved else 0.0
    fit_seconds = sum(r.seconds for r in outcome.history) + solved or seconds
    summary = summarise(run_id, device, outcome, settings, data, seconds, fit_seconds, export_path)
    if not shard.main:
        return summary  # every rank holds the same weights; rank 0 exports and records them
    plan_row = {"train_path": run_plan.loss, "reason": run_plan.reason, "warning": warning}
    _save_and_record(
        config, model, export_path, inputs, settings, outcome, summary, started_at, plan_row
    )
    if outcome.status == "diverged":
        raise ModelError(
            f"training diverged (loss not finite) in epoch {outcome.diverged_epoch}; the last "
            f"good weights (epoch {outcome.best_epoch}) are in {export_path}; lower --lr "
            "or raise --l2"
        )
    return summary


def _with_fold_in(
    settings: TrainConfig,
    model: MatrixFactorization,
    data: Interactions,
    outcome: Outcome,
    console: Console | None,
) -> TrainConfig:
    """After the user solve, the fold-in half-life calibrated on the run's own users
    (mfbatch.serving.calibrate), recorded so score and the refit use it; unless given."""
    if outcome.solved is None or settings.fold_in_half_life is not None or data.ts is None:
        return settings
    users_aug, items_aug_t = augmented_tables(model)
    ratings = (data.users.cpu().numpy(), data.items.cpu().numpy(), data.ts.cpu().numpy())
    half_lives = candidates(
        float(settings.user_half_life or 0.0), float(settings.recency_half_life or 0.0)
    )
    prior = fold_in_prior(settings.model_dump())
    best, overlap = calibrated_half_life(
        users_aug, items_aug_t, ratings, half_lives, seed=settings.seed, prior=prior
    )
    if console:
        shown = ", ".join(f"{h:.3g}: {overlap[h]:.3f}" for h in half_lives)
        console.print(
            f"fold-in half-life {best:.3g}: the run's own users fold back in closest to their "
            f"lists there (top-20 overlap {shown})",
            highlight=False,
            soft_wrap=True,
        )
    return settings.replace(fold_in_half_life=round(best, 4))


def _decay(outcome: Outcome, settings: TrainConfig) -> str | None:
    """`decay_warning` on the run's validation curve (Recall@K; RMSE is not checked)."""
    curve = [
        (r.epoch, r.train_loss, r.metrics.recall if r.metrics else None) for r in outcome.history
    ]
    return decay_warning(curve, f"Recall@{settings.top_k}")


def _save_and_record(
    config: Config,
    model: MatrixFactorization,
    export_path: Path,
    inputs: TrainInputs,
    settings: TrainConfig,
    outcome: Outcome,
    summary: TrainSummary,
    started_at: datetime,
    plan_row: dict[str, str | None],
) -> None:
    """The run's folder, then its rows (with the plan's); if either fails, the folder goes
    too: no model is left that no run names (a full disk, or another process taking the
    write lock while this one trained)."""
    # The lock was free when training started; refuse before writing files if it is not
    # now, and hold it until the rows are in.
    con = db.connect(config.db)
    try:
        save_run(
            model,
            export_path,
            run_id=summary.run_id,
            parent=inputs.parent,
            dataset=inputs.dataset,
            settings=settings,
            outcome=outcome,
        )
        record_run(
            con, config, settings, summary, outcome, inputs.dataset, inputs.parent, started_at,
            plan_row,
        )  # fmt: skip
    except ModelError as exc:
        shutil.rmtree(export_path, ignore_errors=True)
        cause = first_line(exc).split("; ")[0]
        raise ModelError(
            f"{cause}; nothing was recorded and the run's files were removed: free space "
            "(or pass --export-dir) and train again"
        ) from None
    except MfbatchError:
        shutil.rmtree(export_path, ignore_errors=True)
        raise
    finally:
        con.close()


def _fit(
    model: MatrixFactorization,
    data: Interactions,
    val: Validation | None,
    settings: TrainConfig,
    epochs: int | None,
    console: Console | None,
    shard: distributed.Shard | None = None,
    run_plan: Plan | None = None,
    select: bool = True,
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
        status = _status(record, settings.top_k)
        progress.update(tasks[record.epoch], status=status)
        if log_lines and console is not None:
            console.print(
                f"epoch {record.epoch}/{total_epochs} {status}  {record.seconds:.2f} s",
                highlight=False,
                soft_wrap=True,
            )

    with progress:
        outcome = train_model(
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
            run_plan=run_plan,
            select=select,
        )
    if outcome.solved is not None and console is not None:
        console.print(
            f"users solved again ({USER_SOLVE_EPOCHS} epochs, user half-life "
            f"{settings.user_half_life:g}, item tables fixed): "
            f"{_status(outcome.solved, settings.top_k)}  {outcome.solved.seconds:.2f} s",
            highlight=False,
            soft_wrap=True,
        )
    return outcome


def _status(record: EpochRecord, top_k: int) -> str:
    status = f"loss {record.train_loss:.4f}"
    if record.metrics is not None:
        if record.metrics.rmse is not None:
            status += f"  val RMSE {record.metrics.rmse:.4f}"
        if record.metrics.recall is not None:
            status += f"  Recall@{top_k} {record.metrics.recall:.4f}"
            status += f"  NDCG@{top_k} {record.metrics.ndcg or 0.0:.4f}"
    return status
