"""The Python API: the same stage functions the CLI runs, keyword-only, typed.

    import mfbatch
    mfbatch.preprocess(db="ml.duckdb", dataset="ml-100k", source="ml-100k.zip",
                       split={"kind": "user-time", "val_fraction": 0.2})
    run = mfbatch.train(db="ml.duckdb")                # TrainConfig fields as keywords
    figures = mfbatch.evaluate(db="ml.duckdb", top_k=20)
    mfbatch.train(db="ml.duckdb", on="all")            # the serving refit
    mfbatch.score(db="ml.duckdb", top_k=20)
    lists = mfbatch.read_lists(db="ml.duckdb")         # a Polars frame, raw ids
    model = mfbatch.load(db="ml.duckdb")               # the served run, as an object
    model.recommend(["1"], k=10); model.similar_items(["50"], k=5)

The stages themselves live in `mfbatch.stages` (one module each).

Each takes `db` (a path) and/or `config` (a TOML path or a loaded `Config`); keywords
override the config's section for that stage and are type-checked like CLI flags. Errors
are `mfbatch.errors.MfbatchError` subclasses with a one-line message. Heavy modules
(torch, onnxruntime) load only when a function needs them. `verbose=True` prints what the
CLI prints while a stage works (epochs, tenths of the users) on stderr; the default is
silent. `preprocess(source=...)` also takes a Polars, pandas or Arrow frame.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mfbatch.config import Config, load_config
from mfbatch.errors import ConfigError, MfbatchError

if TYPE_CHECKING:
    import polars as pl
    from rich.console import Console

    from mfbatch.model_api import Model
    from mfbatch.stages.append import AppendSummary
    from mfbatch.stages.evaluate import Evaluation
    from mfbatch.stages.preprocess import PreprocessSummary
    from mfbatch.stages.recommend import UserReport
    from mfbatch.stages.report import ReportSummary
    from mfbatch.stages.score import ScoreSummary
    from mfbatch.stages.train import TrainSummary
    from mfbatch.store.history import Diff
    from mfbatch.store.runs import RunListing

PathLike = str | os.PathLike[str]


def _path(name: str, value: object) -> Path:
    """A path argument: str or os.PathLike (of str); anything else a ConfigError naming it."""
    if isinstance(value, str) or (
        isinstance(value, os.PathLike) and isinstance(os.fspath(value), str)
    ):
        if not str(value).strip():
            raise ConfigError(f"{name}=: an empty path; pass a file name")
        return Path(value)
    raise ConfigError(f"{name}=: expected a path (str or pathlib.Path), got {value!r}")


def _whole(name: str, value: object) -> int | None:
    """An optional whole-number argument (a publish id): "1" or True is refused, not guessed."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ConfigError(f"{name}=: expected a whole number or None, got {value!r}")


def _config(
    config: Config | PathLike | None,
    db: PathLike | None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """The stage's Config: a loaded one or a TOML path, with keyword overrides validated
    like flags (a wrong type or value is a ConfigError naming the keyword)."""
    db_path = _path("db", db) if db is not None else None
    if not isinstance(config, Config):
        if config is not None and not isinstance(config, (str, os.PathLike)):
            raise ConfigError(
                f"config=: a Config or the path of a TOML file, got {type(config).__name__}; "
                "pass section values as keywords (top_k=20) instead"
            )
        path = _path("config", config) if config is not None else None
        return load_config(path, db=db_path, overrides=overrides)
    if db_path is not None:
        config = config.model_copy(update={"db": db_path})
    for section, values in (overrides or {}).items():
        config = config.override(section, values, where=f"{section}=")
    return config


def _console(verbose: bool) -> Console | None:
    from mfbatch.progress import log_console

    return log_console() if verbose else None


def _frame_type(source: Any) -> str | None:
    """'polars', 'pandas' or 'arrow' for an in-memory frame, None for anything else."""
    module = type(source).__module__.split(".")[0]
    if module in ("polars", "pandas", "pyarrow") and hasattr(source, "columns"):
        return {"pyarrow": "arrow"}.get(module, module)
    return None


def _frame_to_parquet(source: Any, kind: str, folder: Path) -> Path:
    """An in-memory frame written where the Parquet loader reads it: one code path for
    files and frames, so ids, scale and split come out the same."""
    import polars as pl

    frame = source if kind == "polars" else pl.from_pandas(source) if kind == "pandas" else None
    if frame is None:
        frame = pl.from_arrow(source)
    assert isinstance(frame, pl.DataFrame)
    path = folder / "source.parquet"
    frame.write_parquet(path)
    return path


def preprocess(
    *,
    db: PathLike | None = None,
    config: Config | PathLike | None = None,
    split: Mapping[str, Any] | str | None = None,
    verbose: bool = False,
    **data: Any,
) -> PreprocessSummary:
    """Read ratings into the database: `data` are DataConfig fields, `split` SplitConfig's.

    `source` may be a file/folder path or a Polars, pandas or Arrow frame (its columns
    named by user_col/item_col/rating_col/time_col like a file's)."""
    import tempfile

    from mfbatch.stages.preprocess import preprocess as run

    if isinstance(split, str):
        split = {"kind": split}  # preprocess(split="random") reads as the split's kind
    if split is not None and not isinstance(split, Mapping):
        raise ConfigError(
            f"split=: a kind ('random') or a mapping like {{'kind': 'user-time', "
            f"'val_fraction': 0.2}}, got {split!r}"
        )
    kind = _frame_type(data.get("source"))
    if kind is None:
        return run(config=_config(config, db, {"data": data, "split": split or {}}),
                   console=_console(verbose))  # fmt: skip
    if data.setdefault("dataset", "parquet") != "parquet":
        raise ConfigError(f"source: a {kind} frame is read as dataset='parquet', not "
                          f"{data['dataset']!r}; drop dataset=")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mfbatch-frame-") as folder:
        data["source"] = path = _frame_to_parquet(data["source"], kind, Path(folder))
        resolved = _config(config, db, {"data": data, "split": split or {}})
        try:
            return run(config=resolved, console=_console(verbose))
        except MfbatchError as exc:
            # Name the frame the caller passed, not the temporary file it was written to.
            message = str(exc).replace(str(path), f"source (a {kind} frame)")
            raise type(exc)(message) from None


def append(
    *, db: PathLike | None = None, config: Config | PathLike | None = None, **data: Any
) -> AppendSummary:
    """Add new ratings (`source=...`, DataConfig fields) to the dataset; `score` then folds
    in every user whose ratings the served run has not seen."""
    from mfbatch.stages.append import append as run

    if data.get("source") is None:
        raise ConfigError("append: name the file of new ratings with source=...")
    return run(config=_config(config, db, {"data": data}))


def train(
    *,
    db: PathLike | None = None,
    config: Config | PathLike | None = None,
    verbose: bool = False,
    **settings: Any,
) -> TrainSummary:
    """Train (or, with on="all", refit) and export a run; `settings` are TrainConfig fields."""
    from mfbatch.stages.train import train as run

    return run(config=_config(config, db, {"train": settings}), console=_console(verbose))


def evaluate(
    *,
    db: PathLike | None = None,
    config: Config | PathLike | None = None,
    verbose: bool = False,
    **settings: Any,
) -> Evaluation:
    """Measure the validated run on its own lists; `settings` are EvaluateConfig fields."""
    from mfbatch.stages.evaluate import evaluate as run

    return run(config=_config(config, db, {"evaluate": settings}), console=_console(verbose))


def score(
    *,
    db: PathLike | None = None,
    config: Config | PathLike | None = None,
    verbose: bool = False,
    **settings: Any,
) -> ScoreSummary:
    """Publish the served lists; `settings` are ScoreConfig fields (top_k, users, ...)."""
    from mfbatch.stages.score import score as run

    return run(config=_config(config, db, {"score": settings}), console=_console(verbose))


def recommend(
    *, user_id: str, db: PathLike | None = None, config: Config | PathLike | None = None
) -> UserReport:
    """One user's served list beside their own top-rated items."""
    from mfbatch.stages.recommend import recommend as run

    if not isinstance(user_id, str):
        raise ConfigError(f"user_id=: a raw user id as a string, got {user_id!r}")
    return run(db_path=_config(config, db).db, user_id=user_id)


def load(
    *,
    db: PathLike | None = None,
    config: Config | PathLike | None = None,
    run: str = "latest",
    provider: str = "cpu",
    threads: int | None = None,
) -> Model:
    """A run as an object with `recommend(users or histories, k, include, exclude)` and
    `similar_items(items, k)` over its compiled graph; `run` as score's --run-id ('latest':
    the run `score` serves)."""
    from mfbatch.model_api import load_model

    resolved = _config(config, db, {"score": {"run_id": run}})
    return load_model(resolved, provider=provider, threads=threads)


def read_lists(
    *,
    db: PathLike | None = None,
    config: Config | PathLike | None = None,
    publish: int | None = None,
) -> pl.DataFrame:
    """The served lists (or a kept publish) as a Polars frame: raw ids, rank, score, source."""
    from mfbatch.store.history import read_lists as run

    return run(db_path=_config(config, db).db, publish=_whole("publish", publish))


def list_runs(
    *, db: PathLike | None = None, config: Config | PathLike | None = None
) -> list[RunListing]:
    """Every training run, newest first."""
    from mfbatch.store import runs

    return runs.list_runs(db_path=_config(config, db).db)


def diff(
    *,
    db: PathLike | None = None,
    config: Config | PathLike | None = None,
    before: int | None = None,
    after: int | None = None,
) -> Diff:
    """What changed between two publishes of the served lists (default: the last two)."""
    from mfbatch.store.history import diff as run

    return run(
        db_path=_config(config, db).db,
        before=_whole("before", before),
        after=_whole("after", after),
    )


def report(
    *,
    out: PathLike,
    db: PathLike | None = None,
    config: Config | PathLike | None = None,
    run_id: str = "latest",
) -> ReportSummary:
    """Write the offline HTML report of a validated run."""
    from mfbatch.stages.report import report as run

    if not isinstance(run_id, str):
        raise ConfigError(f"run_id=: a run id or 'latest', got {run_id!r}")
    out_path = _path("out", out)
    resolved = _config(config, db)
    return run(
        db_path=resolved.db, out=out_path, run_id=run_id, export_dir=resolved.train.export_dir
    )


def tune(
    *,
    db: PathLike | None = None,
    config: Config | PathLike | None = None,
    train: Mapping[str, Any] | None = None,
    **settings: Any,
) -> Any:
    """Search train settings on an inner split of train (Optuna); `settings` are TuneConfig
    fields, `train` the TrainConfig fields the search starts from. Returns a TuneSummary;
    `train` then applies the chosen settings below its own keywords."""
    from mfbatch.stages.tune import tune as run

    return run(config=_config(config, db, {"tune": settings, "train": train or {}}))
