"""`mfbatch tune`: an Optuna search (TPE, median pruning) on an inner split carved from train.

The outer validation split is never read: the train rows alone are split again (each user's
newest `inner_fraction` when every rating has a time, else a seeded random share per user),
each trial trains on the inner train part and is scored per epoch on the inner validation
part (the trainer's own Recall@K, or -RMSE for the rating objective), which also drives the
pruning. Every trial lands in `tuning_trials`; the best so far in `tuned_settings`, which
`train` applies below explicit flags. The study lives in an Optuna journal beside the
database (`<db>.optuna.journal`), so a search cut off resumes where it stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch
from rich.console import Console

from mfbatch.config import Config, TrainConfig, TuneConfig, with_half_lives
from mfbatch.config.tune import LOG_UNIFORM
from mfbatch.data.transforms import carve_inner, inner_share
from mfbatch.errors import ConfigError, MfbatchError, ModelError, first_line
from mfbatch.stages.train_inputs import Ratings, TrainInputs, interactions
from mfbatch.stages.tune_record import (
    chosen_settings,
    finished,
    hold,
    journal_path,
    open_study,
    record,
)
from mfbatch.store import db
from mfbatch.store.datasets import Dataset
from mfbatch.training.build import data_plan, epoch_budget, l2_strength, new_model
from mfbatch.training.device import resolve_device, resolve_threads
from mfbatch.training.loop import EpochRecord, train_model
from mfbatch.training.tensors import Interactions
from mfbatch.training.validation import Validation, score_of

__all__ = ["TuneSummary", "journal_path", "tune"]


@dataclass(frozen=True)
class TuneSummary:
    study: str
    trials_run: int  # by this call
    trials_finished: int  # in the study, all calls together
    best_trial: int | None
    best_value: float | None
    metric: str
    settings: dict[str, Any]  # what `train` will apply below its flags
    inner_split: str
    seconds: float
    journal: Path

    def line(self) -> str:
        if self.best_trial is None:
            return (
                f"study {self.study!r}: no trial completed ({self.trials_finished} finished); "
                "train keeps its defaults"
            )
        shown = " ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.settings.items()
        )
        return (
            f"study {self.study!r}: best trial {self.best_trial} ({self.metric} "
            f"{self.best_value:.4f} on the inner {self.inner_split} split) of "
            f"{self.trials_finished}, {self.trials_run} run now in {self.seconds:.1f} s: "
            f"{shown}; `mfbatch train` applies these below its flags"
        )


def _suggest(trial: Any, base: TrainConfig, tune: TuneConfig, inner: _Inner) -> dict[str, Any]:
    """The TrainConfig fields one trial sets."""
    space = tune.ranges()
    params: dict[str, Any] = {
        "embedding_dim": int(trial.suggest_categorical("embedding_dim", space["embedding_dim"])),
        "epochs": trial.suggest_int("epochs", min(10, tune.epochs), tune.epochs),
    }
    if inner.sampled:
        low, high = space["negatives"]
        params["negatives"] = trial.suggest_int("negatives", int(low), int(high), log=True)
    names = ["lr", "l2"]
    if base.objective != "rating":
        names += ["temperature", "user_exponent"]
    for name in names:
        low, high = space[name]
        params[name] = trial.suggest_float(name, low, high, log=name in LOG_UNIFORM)
    if base.objective != "rating":
        recency = inner.timed and trial.suggest_categorical("recency", [True, False])
        low, high = space["recency_half_life"]
        params["recency_half_life"] = (
            trial.suggest_float("recency_half_life", low, high) if recency else 0.0
        )
        low, high = space["user_half_life"]
        params["user_half_life"] = (
            trial.suggest_float("user_half_life", low, high) if recency else 0.0
        )
    return params


def _clip(space: dict[str, Any], name: str, value: float) -> float:
    """`value` within the search's range for `name`."""
    low, high = space[name]
    return float(min(max(value, low), high))


def _data_l2(base: TrainConfig, tune: TuneConfig, inner: _Inner) -> float | None:
    """train's L2 rule on the inner rows, clipped to the range; None when `--l2` is set.
    A trial at it has the data's default, which a train on all of train resolves again
    from its own (denser) rows."""
    if base.l2 is not None:
        return None
    return _clip(tune.ranges(), "l2", l2_strength(inner.data, base))


def _defaults(
    base: TrainConfig, tune: TuneConfig, inner: _Inner, data_l2: float | None
) -> dict[str, Any]:
    """The search's own parameters for `train`'s defaults, clipped to the ranges."""
    space = tune.ranges()

    def clip(name: str, value: float) -> float:
        return _clip(space, name, value)

    epochs = epoch_budget(inner.dataset.n_items, inner.data, base)
    params: dict[str, Any] = {
        "epochs": int(min(max(int(epochs), min(10, tune.epochs)), tune.epochs)),
        "lr": clip("lr", float(base.lr or 0.0)),
        "l2": data_l2 if data_l2 is not None else clip("l2", float(base.l2 or 0.0)),
    }
    if base.embedding_dim in space["embedding_dim"]:
        params["embedding_dim"] = int(base.embedding_dim or 0)
    if inner.sampled:
        params["negatives"] = int(clip("negatives", base.negatives))
    if base.objective != "rating":
        params["temperature"] = clip("temperature", base.temperature)
        params["user_exponent"] = clip("user_exponent", base.user_exponent)
        resolved = with_half_lives(base, inner.dataset.split_kind)
        half_life = float(resolved.recency_half_life or 0.0)
        solve = float(resolved.user_half_life or 0.0)
        if inner.timed:
            params["recency"] = bool(half_life)
            if half_life:
                params["recency_half_life"] = clip("recency_half_life", half_life)
                params["user_half_life"] = clip("user_half_life", solve) if solve else 0.0
    return params


def _neighbours(start: dict[str, Any], tune: TuneConfig) -> list[dict[str, Any]]:
    """One-setting changes of the defaults' point, most promising first (docs/model.md:
    the recency half-life and the epoch budget are the settings whose best value moved
    between data sets; L2 next), each clipped to the ranges and new. A search of a few
    trials is then a local one around what `train` does, where TPE's first trials are
    random points across the whole space, which on every data set measured lost to the
    defaults."""
    space = tune.ranges()

    def scaled(name: str, factor: float) -> dict[str, Any] | None:
        if name not in start:
            return None
        value: float = _clip(space, name, start[name] * factor)
        if isinstance(start[name], int):  # a count (negatives) stays whole
            value = int(value)
        return {**start, name: value} if value != start[name] else None

    half = max(min(10, tune.epochs), int(start["epochs"]) // 2)
    double = min(tune.epochs, 2 * int(start["epochs"]))
    # The default half-lives are the best worst case between sets whose own best lies on
    # either side (docs/model.md): a step each way on training's, then on the user solve's.
    # A sampled run first tries more negatives: the one setting that measured better on
    # the sampled set's inner split (Amazon-CDs: 4x as many, +3.7% Recall@20 at 1.7x the
    # time; docs/model.md, "Tuning"), where a full softmax has no such knob; then twice
    # the epochs, the side of the sampled floor that train's default gives up for time
    # (Amazon-CDs' inner split: 80 epochs +1.0% over 40; docs/model.md, "Defaults").
    sampled = "negatives" in start
    candidates = [
        scaled("negatives", 4.0),
        {**start, "epochs": double} if sampled and double != start["epochs"] else None,
        scaled("recency_half_life", 0.75),
        scaled("recency_half_life", 1.5),
        scaled("user_half_life", 0.5),
        scaled("user_half_life", 2.0),
        {**start, "epochs": half} if half != start["epochs"] else None,
        scaled("l2", 2.0),
        scaled("l2", 0.5),
    ]
    unique: list[dict[str, Any]] = []
    for point in candidates:
        if point is not None and point not in unique:
            unique.append(point)
    return unique


@dataclass(frozen=True)
class _Inner:
    dataset: Dataset
    data: Interactions
    val: Validation
    kind: str
    fraction: float  # of each user's train ratings held out
    timed: bool
    # Whether train's defaults would take the sampled softmax on these rows (the search
    # then also sets --negatives).
    sampled: bool


def _read_inner(config: Config, device: torch.device) -> _Inner:
    con = db.connect(config.db, read_only=True)
    try:
        dataset = Dataset.load(con, config.db)
        # all_splits=False leaves appended ratings out, as a validated run does; the outer
        # val rows are dropped here, before anything else looks at the frame.
        frame = db.frame(con, "training_ratings", all_splits=False)
    finally:
        con.close()
    train = frame.filter(~pl.col("is_val")).drop("is_val")
    if train.height == 0:
        raise ConfigError(f"{config.db}: the ratings table has no train rows; run preprocess")
    # The outer split's size (never its rows) sets the inner share when none is given.
    fraction = config.tune.inner_fraction or inner_share(int(frame["is_val"].sum()), frame.height)
    held, kind = carve_inner(train, fraction, config.tune.seed)
    if not held.any():
        raise ConfigError(
            f"--inner-fraction: {fraction:g} holds out no rating of "
            f"{config.db}'s train split (too few ratings per user); raise it"
        )
    inner = train.with_columns(is_val=pl.Series(held))
    settings = config.train.replace(on="train", eval_users=config.train.eval_users)
    data, val = interactions(
        TrainInputs(dataset, Ratings.from_frame(inner), settings, None, None), device, config.db
    )
    assert val is not None
    timed = kind == "user-time"  # carve_inner orders by time only when every rating has one
    sampled = data_plan(dataset.n_items, data, settings).loss == "sampled"
    return _Inner(dataset, data, val, kind, fraction, timed, sampled)


def _objective(
    inner: _Inner,
    base: TrainConfig,
    tune: TuneConfig,
    device: torch.device,
    data_l2: float | None,
) -> Any:
    import optuna

    def run(trial: optuna.Trial) -> float:
        try:
            params = _suggest(trial, base, tune, inner)
            trial.set_user_attr("settings", params)
            if data_l2 is not None and params.get("l2") == data_l2:
                trial.set_user_attr("from_data", ["l2"])
            # Validated every epoch (pruning reads each), patience wide enough not to stop a
            # trial that pruning would keep; the figure is the trial's best epoch.
            settings = base.replace(
                **params, seed=tune.seed, eval_every=1, patience=params["epochs"]
            )
            # settings.seed is tune.seed: the same start as before for every trial.
            model = new_model(inner.dataset.n_users, inner.dataset.n_items, settings, device)
            best = -float("inf")

            def report(record: EpochRecord) -> None:
                nonlocal best
                if record.metrics is None:
                    return
                best = max(best, score_of(record.metrics, settings.objective))
                trial.report(score_of(record.metrics, settings.objective), record.epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()

            outcome = train_model(model, inner.data, inner.val, settings, on_epoch_end=report)
            if outcome.status == "diverged":
                raise ModelError(f"training diverged in epoch {outcome.diverged_epoch}")
            solved = outcome.solved.metrics if outcome.solved is not None else None
            # With the user solve, the trained model is the solved one: that is its figure.
            return score_of(solved, settings.objective) if solved is not None else best
        except (MfbatchError, RuntimeError, ValueError) as exc:
            trial.set_user_attr("error", first_line(exc))
            raise

    return run


def _metric(settings: TrainConfig) -> str:
    return "-rmse" if settings.objective == "rating" else f"recall@{settings.top_k}"


def _line(trial: Any, total: int, best: Any, metric: str) -> str:
    seconds = (
        (trial.datetime_complete - trial.datetime_start).total_seconds()
        if trial.datetime_complete and trial.datetime_start
        else 0.0
    )
    settings = trial.user_attrs.get("settings", trial.params)
    shown = " ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items()
    )
    what = f"{metric} {trial.value:.4f}" if trial.value is not None else ""
    if trial.state.name != "COMPLETE":  # a pruned trial's value is its last epoch's
        what = f"{trial.state.name.lower()} {what}".strip()
    if trial.user_attrs.get("error"):
        what += f" ({trial.user_attrs['error']})"
    tail = f"; best {best['value']:.4f} (trial {best['trial']})" if best else ""
    # Numbered as Optuna, tuning_trials and the summary number them (from 0), with the
    # count beside it.
    return (
        f"trial {trial.number} ({trial.number + 1} of {total}): {what}  {shown}  "
        f"{seconds:.1f} s{tail}"
    )


def tune(*, config: Config, console: Console | None = None) -> TuneSummary:
    """Search, record every trial, write the best settings where `train` reads them."""
    import optuna

    started = time.perf_counter()
    settings = config.tune
    db.check_writable(config.db)
    device = resolve_device(config.train.device)
    if device.type == "cpu":
        threads, note = resolve_threads(settings.threads)
        torch.set_num_threads(threads)
        if note and console:
            console.print(f"note: {note}", highlight=False)
    inner = _read_inner(config, device)
    # Our own line per trial says what failed and why; Optuna would add a traceback.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with hold(config):
        return _search(config, inner, device, console, started)


def _search(
    config: Config, inner: _Inner, device: torch.device, console: Console | None, started: float
) -> TuneSummary:
    import optuna

    settings = config.tune
    study = open_study(config, inner.dataset.sha256, inner.fraction)
    done_before = finished(study)
    remaining = max(0, settings.trials - done_before)
    metric = _metric(config.train)
    what = str(config.train.objective)
    if inner.sampled:
        what = "the sampled softmax (--negatives searched too)"
    if console:
        console.print(
            f"tuning {what} on an inner {inner.kind} split of the train ratings "
            f"({inner.fraction:g} of each user's: {len(inner.data)} train / "
            f"{len(inner.val.pairs)} inner val; the outer val split is not read): "
            f"study {settings.study!r}, {done_before} trial(s) done, {remaining} to run",
            highlight=False,
            soft_wrap=True,
        )
    # Reseeded past the trials already run, so a resumed search draws new points.
    study.sampler = optuna.samplers.TPESampler(seed=settings.seed + len(study.trials))
    study.pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=3)
    best: dict[str, Any] | None = None

    def after(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        nonlocal best
        best = record(config, study, metric, inner.dataset.sha256)
        if console:
            console.print(_line(trial, settings.trials, best, metric), highlight=False)

    base = config.train.replace(on="train")
    data_l2 = _data_l2(base, settings, inner)
    if not study.trials:
        # The first trial is the defaults (within the ranges): the choice can only match
        # or beat what `train` would do untuned, on the same inner split.
        start = _defaults(base, settings, inner, data_l2)
        study.enqueue_trial(start, skip_if_exists=True)
        # Then its neighbours, leaving at least one trial to the sampler.
        for point in _neighbours(start, settings)[: max(0, settings.trials - 2)]:
            study.enqueue_trial(point, skip_if_exists=True)
    if remaining:
        study.optimize(
            _objective(inner, base, settings, device, data_l2),
            n_trials=remaining,
            timeout=settings.timeout,
            catch=(MfbatchError, RuntimeError, ValueError),
            callbacks=[after],
        )
    best = record(config, study, metric, inner.dataset.sha256)
    chosen = chosen_settings(study.trials[best["trial"]]) if best else {}
    return TuneSummary(
        study=settings.study,
        trials_run=finished(study) - done_before,
        trials_finished=finished(study),
        best_trial=best["trial"] if best else None,
        best_value=best["value"] if best else None,
        metric=metric,
        settings=chosen,
        inner_split=inner.kind,
        seconds=round(time.perf_counter() - started, 3),
        journal=journal_path(config.db),
    )
