"""Where a search lives: the Optuna journal beside the database (one search at a time),
and every trial recorded in DuckDB (`tuning_trials`, the chosen `tuned_settings`)."""

from __future__ import annotations

import fcntl
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from mfbatch.config import Config
from mfbatch.errors import ConfigError
from mfbatch.store import db


def journal_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".optuna.journal")


def hold(config: Config) -> IO[str]:
    """One search per database at a time, held by an OS lock that dies with its process;
    holding it, a lock file Optuna's journal left behind a killed search is stale."""
    journal = journal_path(config.db)
    held = open(journal.with_name(journal.name + ".owner"), "a")  # noqa: SIM115
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        held.close()
        raise ConfigError(
            f"{config.db}: another `mfbatch tune` is searching on it; wait for it to finish"
        ) from None
    journal.with_name(journal.name + ".lock").unlink(missing_ok=True)
    return held


def open_study(config: Config, sha: str, inner_fraction: float) -> Any:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(journal_path(config.db))))
    study = optuna.create_study(
        study_name=config.tune.study,
        storage=storage,
        direction="maximize",
        load_if_exists=True,
    )
    known = study.user_attrs.get("dataset_sha256")
    if known is None:
        study.set_user_attr("dataset_sha256", sha)
        study.set_user_attr("objective", config.train.objective)
        study.set_user_attr("inner_fraction", inner_fraction)
    elif known != sha or study.user_attrs.get("objective") != config.train.objective:
        raise ConfigError(
            f"--study: {config.tune.study!r} was searched on other data or another objective "
            f"({journal_path(config.db)}); pass a new --study name"
        )
    # Trials scored on different inner splits do not compare (studies from before the
    # share was recorded were carved at 0.2, the default then).
    earlier = float(study.user_attrs.get("inner_fraction", 0.2))
    if abs(earlier - inner_fraction) > 1e-9:
        raise ConfigError(
            f"--inner-fraction: study {config.tune.study!r} was searched on an inner split of "
            f"{earlier:g}, this run's is {inner_fraction:g}; pass --inner-fraction "
            f"{earlier:g} to resume it, or a new --study name"
        )
    # A trial left RUNNING was cut off with its process: failed, and not counted.
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        storage.set_trial_user_attr(t._trial_id, "error", "interrupted")
        storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    return study


def finished(study: Any) -> int:
    import optuna

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return sum(
        1
        for t in study.get_trials(deepcopy=False)
        if t.state in done
        or (t.state == optuna.trial.TrialState.FAIL and not t.user_attrs.get("interrupted"))
    )


def chosen_settings(trial: Any) -> dict[str, Any]:
    """What `train` applies from a trial: its settings less those it took from the data
    (the L2 rule on the inner rows), which `train` resolves again from its own rows."""
    derived = set(trial.user_attrs.get("from_data", []))
    return {k: v for k, v in trial.user_attrs["settings"].items() if k not in derived}


def record(config: Config, study: Any, metric: str, sha: str) -> dict[str, Any] | None:
    """Mirror the study into `tuning_trials`; the best complete trial into `tuned_settings`."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    con = db.connect(config.db)
    try:
        with db.transaction(con, "the tuning trials"):
            db.run(con, "create_tuning_trials")
            db.run(con, "create_tuned_settings")
            db.run(con, "clear_tuning_trials", study=config.tune.study)
            for t in trials:
                seconds = (
                    (t.datetime_complete - t.datetime_start).total_seconds()
                    if t.datetime_complete and t.datetime_start
                    else None
                )
                db.run(
                    con,
                    "insert_tuning_trial",
                    study=config.tune.study,
                    trial=t.number,
                    params=json.dumps(t.user_attrs.get("settings", t.params)),
                    value=t.value if t.state == optuna.trial.TrialState.COMPLETE else None,
                    metric=metric,
                    state=t.state.name,
                    seconds=seconds,
                    error=t.user_attrs.get("error"),
                )
            if best is not None:
                db.run(
                    con,
                    "replace_tuned_settings",
                    study=config.tune.study,
                    chosen_at=datetime.now(timezone.utc).replace(tzinfo=None),
                    objective=config.train.objective,
                    trial=best.number,
                    value=best.value,
                    metric=metric,
                    settings=json.dumps(chosen_settings(best)),
                    dataset_sha256=sha,
                )
    finally:
        con.close()
    return None if best is None else {"trial": best.number, "value": best.value}
