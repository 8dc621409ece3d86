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
override the config's sections for that stage (preprocess and append: [data] and
[preprocess] fields, each routed to the section that declares it) and are type-checked
like CLI flags; an unknown one names the close match. Errors are
`mfbatch.errors.MfbatchError` subclasses with a one-line message. Heavy modules (torch,
onnxruntime) load only when a function needs them. `verbose=True` prints what the CLI
prints while a stage works (epochs, tenths of the users) on stderr; the default is silent.
`preprocess` and `append` take a Polars, pandas or Arrow frame for `source=` and
`items_source=` as well as a file.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from mfbatch.config import Config, load_config
from mfbatch.errors import ConfigError, MfbatchError

if TYPE_CHECKING:
    import polars as pl
    from rich.console import Console

    from mfbatch.model_api import Model
    from mfbatch.stages.append import AppendSummary
    from mfbatch.stages.append_items import RefreshSummary
    from mfbatch.stages.evaluate import Evaluation
    from mfbatch.stages.preprocess import PreprocessSummary
    from mfbatch.stages.recommend import UserReport
    from mfbatch.stages.report import ReportSummary
    from mfbatch.stages.score import ScoreSummary
    from mfbatch.stages.train import TrainSummary
    from mfbatch.store.history import Diff
    from mfbatch.store.runs import RunListing

PathLike = str | os.PathLike[str]
T = TypeVar("T")


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


# Where a keyword the section fields do not hold is taken (a hint in the error).
_TAKEN_BY = {"data": "preprocess", "split": "preprocess", "preprocess": "preprocess"}


def _route(
    function: str, keywords: Mapping[str, Any], sections: tuple[str, ...]
) -> dict[str, dict[str, Any]]:
    """Each keyword under the section that declares it (the first of `sections`: data's
    seed before split's); an unknown one a ConfigError naming the close match."""
    from mfbatch.config.load import SECTIONS

    routed: dict[str, dict[str, Any]] = {section: {} for section in sections}
    for name, value in keywords.items():
        home = next((s for s in sections if name in SECTIONS[s].model_fields), None)
        if home is None:
            raise ConfigError(_unknown(function, name, sections))
        routed[home][name] = value
    return routed


def _unknown(function: str, name: str, sections: tuple[str, ...]) -> str:
    import difflib

    from mfbatch.config.load import SECTIONS

    where = f"{function}({name}=...)"
    known = sorted({field for s in sections for field in SECTIONS[s].model_fields})
    close = difflib.get_close_matches(name, known, n=1)
    if name not in SECTIONS["split"].model_fields and close:
        return f"{where}: unknown keyword; did you mean {close[0]}=?"
    # Another stage's keyword (or a near miss of one): name the call that takes it.
    for section, options in SECTIONS.items():
        near = difflib.get_close_matches(name, list(options.model_fields), n=1, cutoff=0.8)
        if section in sections or not near:
            continue
        if section == "split":
            return f"{where}: a split setting; pass split={{{near[0]!r}: ...}} to preprocess"
        taker = _TAKEN_BY.get(section, section)
        call = f"mfbatch.{taker}({near[0]}=...)"
        return f"{where}: not one of {function}'s keywords; did you mean {call}?"
    return f"{where}: unknown keyword; known: {', '.join(known)}"


def _frame_type(source: Any) -> str | None:
    """'polars', 'pandas' or 'arrow' for an in-memory frame, None for anything else."""
    module = type(source).__module__.split(".")[0]
    if module in ("polars", "pandas", "pyarrow") and hasattr(source, "columns"):
        return {"pyarrow": "arrow"}.get(module, module)
    return None


def _frame_to_parquet(source: Any, kind: str, path: Path) -> Path:
    """An in-memory frame written where the Parquet reader reads it: one code path for
    files and frames, so ids, scale and split come out the same."""
    import polars as pl

    frame = source if kind == "polars" else pl.from_pandas(source) if kind == "pandas" else None
    if frame is None:
        frame = pl.from_arrow(source)
    assert isinstance(frame, pl.DataFrame)
    frame.write_parquet(path)
    return path


# The keywords that take a frame as well as a file: (section, field).
_FRAME_KEYWORDS = (("data", "source"), ("preprocess", "items_source"))


@contextmanager
def _frames(routed: dict[str, dict[str, Any]]) -> Iterator[dict[str, str]]:
    """Frames given for source= / items_source= written as Parquet files (in `routed`) for
    the call's duration; yields {file: how the caller passed it} for `_named`."""
    found = {
        (section, key): kind
        for section, key in _FRAME_KEYWORDS
        if (kind := _frame_type(routed.get(section, {}).get(key))) is not None
    }
    if not found:
        yield {}
        return
    data = routed["data"]
    if ("data", "source") in found and data.setdefault("dataset", "parquet") != "parquet":
        kind = found["data", "source"]
        raise ConfigError(f"source: a {kind} frame is read as dataset='parquet', not "
                          f"{data['dataset']!r}; drop dataset=")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mfbatch-frame-") as folder:
        names = {}
        for (section, key), kind in found.items():
            path = Path(folder) / f"{key}.parquet"
            routed[section][key] = _frame_to_parquet(routed[section][key], kind, path)
            names[str(path)] = f"{key} (a {kind} frame)"
        yield names


def _named(names: Mapping[str, str], call: Callable[[], T]) -> T:
    """`call()`, its errors and summary naming the frames the caller passed, not the
    temporary files they were written to."""

    def rename(text: str) -> str:
        for path, name in names.items():
            text = text.replace(path, name)
        return text

    try:
        result = call()
    except MfbatchError as exc:
        if not names:
            raise
        raise type(exc)(rename(str(exc))) from None
    if not names or not dataclasses.is_dataclass(result) or isinstance(result, type):
        return result
    texts = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    renamed = {k: rename(v) for k, v in texts.items() if isinstance(v, str) and v in names}
    return dataclasses.replace(result, **renamed)


def preprocess(
    *,
    db: PathLike | None = None,
    config: Config | PathLike | None = None,
    split: Mapping[str, Any] | str | None = None,
    verbose: bool = False,
    **settings: Any,
) -> PreprocessSummary:
    """Read ratings into the database: `settings` are DataConfig and PreprocessConfig
    fields (source=, items_source=, memory_mb=, ...), `split` SplitConfig's.

    `source` and `items_source` may be a file/folder path or a Polars, pandas or Arrow
    frame (its columns named like a file's: user_col/item_col/..., items_id_col)."""
    from mfbatch.stages.preprocess import preprocess as run

    if isinstance(split, str):
        split = {"kind": split}  # preprocess(split="random") reads as the split's kind
    if split is not None and not isinstance(split, Mapping):
        raise ConfigError(
            f"split=: a kind ('random') or a mapping like {{'kind': 'user-time', "
            f"'val_fraction': 0.2}}, got {split!r}"
        )
    routed = _route("preprocess", settings, ("data", "preprocess"))
    routed["split"] = dict(split or {})
    with _frames(routed) as names:
        return _named(
            names, lambda: run(config=_config(config, db, routed), console=_console(verbose))
        )


def append(
    *, db: PathLike | None = None, config: Config | PathLike | None = None, **settings: Any
) -> AppendSummary | RefreshSummary:
    """Add new ratings (`source=`, a file or a frame, and DataConfig fields) to the
    dataset, and/or refresh its item metadata (`items_source=`; without `source=` only the
    metadata: a RefreshSummary). `score` then folds in every user whose ratings the served
    run has not seen."""
    from mfbatch.stages.append import append as run

    routed = _route("append", settings, ("data", "preprocess"))
    with _frames(routed) as names:
        resolved = _named(names, lambda: _config(config, db, routed))
        if resolved.data.source is None and resolved.preprocess.items_source is None:
            raise ConfigError(
                "append: name new ratings with source=..., or item metadata to refresh "
                "with items_source=... (or both)"
            )
        return _named(names, lambda: run(config=resolved))


def train(
    *,
    db: PathLike | None = None,
    config: Config | PathLike | None = None,
    verbose: bool = False,
    **settings: Any,
) -> TrainSummary:
    """Train (or, with on="all", refit) and export a run; `settings` are TrainConfig fields."""
    from mfbatch.stages.train import train as run

    return run(
        config=_config(config, db, _route("train", settings, ("train",))), console=_console(verbose)
    )


def evaluate(
    *,
    db: PathLike | None = None,
    config: Config | PathLike | None = None,
    verbose: bool = False,
    **settings: Any,
) -> Evaluation:
    """Measure the validated run on its own lists; `settings` are EvaluateConfig fields."""
    from mfbatch.stages.evaluate import evaluate as run

    return run(
        config=_config(config, db, _route("evaluate", settings, ("evaluate",))),
        console=_console(verbose),
    )


def score(
    *,
    db: PathLike | None = None,
    config: Config | PathLike | None = None,
    verbose: bool = False,
    **settings: Any,
) -> ScoreSummary:
    """Publish the served lists; `settings` are ScoreConfig fields (top_k, users, ...)."""
    from mfbatch.stages.score import score as run

    return run(
        config=_config(config, db, _route("score", settings, ("score",))), console=_console(verbose)
    )


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

    routed = _route("tune", settings, ("tune",))
    return run(config=_config(config, db, {**routed, "train": train or {}}))
