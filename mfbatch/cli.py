"""The `mfbatch` command line: thin Typer commands over one library function each.

Library code raises `MfbatchError`s; this module alone turns them into a one-line message
on stderr and an exit code, so a user error never shows a traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from mfbatch.errors import MfbatchError

app = typer.Typer(
    name="mfbatch",
    help="Batch matrix-factorization recommender: preprocess -> train -> evaluate -> score.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
T = TypeVar("T")

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="TOML config file (tables data, split, train, score)."),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the summary as one JSON object instead.")
]
QuietOpt = Annotated[
    bool,
    typer.Option("--quiet", "-q", help="No progress or notes; only the summary (or errors)."),
]
DbOpt = Annotated[
    Path | None,
    typer.Option("--db", help="DuckDB file (default: the config's db, else mfbatch.duckdb)."),
]


def _version(value: bool) -> None:
    if value:
        from mfbatch.version import __version__

        typer.echo(f"mfbatch {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Batch matrix-factorization recommender: preprocess -> train -> evaluate -> score."""


def _plain(value: Any) -> Any:
    """A summary as JSON-able data: dataclasses to dicts, paths and times to strings."""
    import dataclasses
    from datetime import datetime

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _emit(summary: Any, as_json: bool) -> None:
    """Every command's last line: its one-line summary, or the summary as one JSON object."""
    import json

    typer.echo(json.dumps(_plain(summary)) if as_json else summary.line())


def _console(quiet: bool, as_json: bool) -> Console | None:
    # No console: the library prints no progress and no notes.
    return None if quiet or as_json else console


def _guard(action: Callable[[], T]) -> T:
    """Run a library call; user errors become one line on stderr and a non-zero exit."""
    try:
        return action()
    except MfbatchError as exc:
        # escape(): messages hold literal brackets ("[data]", "[1.0, 5.0]"), not markup.
        console.print(
            f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        console.print("[bold red]interrupted:[/bold red] nothing was changed", highlight=False)
        raise typer.Exit(130) from None


def _overrides(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


@app.command()
def preprocess(
    dataset: Annotated[
        str | None,
        typer.Option(
            help="ml-100k, ml-1m (default), ml-10m, ml-20m, ml-25m, ml-latest[-small], "
            "csv, parquet or synthetic."
        ),
    ] = None,
    source: Annotated[
        Path | None,
        typer.Option(
            help="Local zip, folder or file to read. Without it, MovieLens releases are "
            "downloaded into the cache and checksum-verified."
        ),
    ] = None,
    db: DbOpt = None,
    split: Annotated[
        str | None, typer.Option(help="time (global cutoff, default), user-time or random.")
    ] = None,
    val_fraction: Annotated[
        float | None, typer.Option(help="Share of ratings held out for validation (0.1).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the random split.")] = None,
    user_col: Annotated[str | None, typer.Option(help="csv/parquet: user id column.")] = None,
    item_col: Annotated[str | None, typer.Option(help="csv/parquet: item id column.")] = None,
    rating_col: Annotated[str | None, typer.Option(help="csv/parquet: rating column.")] = None,
    time_col: Annotated[
        str | None,
        typer.Option(help="csv/parquet: timestamp column; '' for none (random split only)."),
    ] = None,
    separator: Annotated[str | None, typer.Option(help="csv: field separator (',').")] = None,
    rating_min: Annotated[
        float | None, typer.Option(help="Lowest possible rating (else inferred).")
    ] = None,
    rating_max: Annotated[
        float | None, typer.Option(help="Highest possible rating (else inferred).")
    ] = None,
    users: Annotated[int | None, typer.Option(help="synthetic: number of users.")] = None,
    items: Annotated[int | None, typer.Option(help="synthetic: number of items.")] = None,
    ratings_per_user: Annotated[
        float | None, typer.Option(help="synthetic: mean ratings per user.")
    ] = None,
    data_seed: Annotated[int | None, typer.Option(help="synthetic: generator seed.")] = None,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Where downloads are kept (~/.cache/mfbatch).")
    ] = None,
    memory_mb: Annotated[
        int | None,
        typer.Option(
            help="Parquet sources: preprocess out of core within about this many MB (at "
            "least 512) instead of holding every rating in memory; the same tables.",
        ),
    ] = None,
    append: Annotated[
        bool,
        typer.Option(
            "--append",
            help="Add --source's ratings to the existing --db (ids kept, new ones appended, "
            "split left as it was) instead of replacing it.",
        ),
    ] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Read ratings, map ids, scale to [0,1], split train/val, write DuckDB tables."""
    from mfbatch.config import load_config
    from mfbatch.stages.preprocess import preprocess as run_preprocess

    def action() -> None:
        if append:
            _check_append(source, split, val_fraction, seed)
            if memory_mb is not None:
                from mfbatch.errors import ConfigError

                raise ConfigError("--memory-mb: --append reads its file in memory; drop it")
        resolved = load_config(
            config,
            db=db,
            overrides={
                "data": _overrides(
                    dataset=dataset,
                    source=source,
                    user_col=user_col,
                    item_col=item_col,
                    rating_col=rating_col,
                    time_col=(time_col or None) if time_col is not None else None,
                    separator=separator,
                    rating_min=rating_min,
                    rating_max=rating_max,
                    users=users,
                    items=items,
                    ratings_per_user=ratings_per_user,
                    seed=data_seed,
                    cache_dir=cache_dir,
                ),
                "split": _overrides(kind=split, val_fraction=val_fraction, seed=seed),
                "preprocess": _overrides(memory_mb=memory_mb),
            },
        )
        if time_col == "":
            resolved = _without_time(resolved)
        if append:
            from mfbatch.stages.append import append as run_append

            _emit(run_append(config=resolved), as_json)
            return
        _emit(run_preprocess(config=resolved, console=_console(quiet, as_json)), as_json)

    _guard(action)


@app.command()
def train(
    db: DbOpt = None,
    device: Annotated[
        str | None, typer.Option(help="auto (CUDA when present), cuda or cpu.")
    ] = None,
    objective: Annotated[
        str | None,
        typer.Option(
            help="softmax (default: full softmax over the catalogue, per user), sampled "
            "(logQ-corrected sampled softmax) or rating (MSE on the stars)."
        ),
    ] = None,
    embedding_dim: Annotated[
        int | None, typer.Option(help="Latent dimensions (256 softmax, 128 rating).")
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Most epochs; early stopping may end sooner.")
    ] = None,
    patience: Annotated[
        int | None, typer.Option(help="Epochs without improvement before stopping.")
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Users per step (softmax, sampled; a sampled epoch takes at most 400 "
            "steps) or ratings (rating)."
        ),
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate.")] = None,
    lr_schedule: Annotated[str | None, typer.Option(help="constant or cosine.")] = None,
    optimizer: Annotated[
        str | None, typer.Option(help="adam, adamw, sparse_adam or adagrad.")
    ] = None,
    weight_decay: Annotated[
        float | None, typer.Option(help="Optimizer weight decay (dense optimizers).")
    ] = None,
    l2: Annotated[float | None, typer.Option(help="L2 on the factor rows a step touches.")] = None,
    l2_mode: Annotated[
        str | None, typer.Option(help="frequency (rows weighted by their ratings) or plain.")
    ] = None,
    temperature: Annotated[float | None, typer.Option(help="Softmax temperature (1.0).")] = None,
    user_exponent: Annotated[
        float | None,
        typer.Option(help="Softmax: weight each user's ratings by |I_u|^-x (0.3; 0 = per rating)."),
    ] = None,
    recency_half_life: Annotated[
        float | None,
        typer.Option(
            help="Softmax: a rating's weight halves every this share of its user's history, "
            "newest first (default 0.2 on user-time splits, off otherwise; 0 = off)."
        ),
    ] = None,
    memory_mb: Annotated[
        int | None,
        typer.Option(help="Budget for one step's logits (1024); decides full vs sampled."),
    ] = None,
    dropout: Annotated[float | None, typer.Option(help="Dropout on both embeddings.")] = None,
    batch_norm: Annotated[
        bool | None,
        typer.Option("--batch-norm/--no-batch-norm", help="BatchNorm1d on both embeddings."),
    ] = None,
    negatives: Annotated[
        int | None, typer.Option(help="sampled: items drawn per step (1024).")
    ] = None,
    sampler: Annotated[
        str | None, typer.Option(help="sampled: popularity (default), in-batch or uniform.")
    ] = None,
    eval_every: Annotated[
        int | None, typer.Option(help="Validate every N epochs (5 softmax, 1 rating).")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads (default: the cores not already busy).")
    ] = None,
    top_k: Annotated[int | None, typer.Option(help="K of the validation Recall/NDCG.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for init, shuffling and sampling.")] = None,
    on: Annotated[
        str | None,
        typer.Option(
            help="train (validate, early-stop) or all (refit train+val for the chosen epochs)."
        ),
    ] = None,
    export_dir: Annotated[Path | None, typer.Option(help="Where runs are saved (export/).")] = None,
    nproc: Annotated[
        int | None,
        typer.Option(help="Data-parallel processes (1): gloo on CPU, NCCL on GPUs."),
    ] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Train the MF model on the train split, early-stop on val, save export/<run_id>/."""
    from mfbatch.config import load_config
    from mfbatch.stages.train import train as run_train

    def action() -> None:
        resolved = load_config(
            config,
            db=db,
            overrides={
                "train": _overrides(
                    device=device,
                    objective=objective,
                    embedding_dim=embedding_dim,
                    epochs=epochs,
                    patience=patience,
                    batch_size=batch_size,
                    lr=lr,
                    lr_schedule=lr_schedule,
                    optimizer=optimizer,
                    weight_decay=weight_decay,
                    l2=l2,
                    dropout=dropout,
                    batch_norm=batch_norm,
                    l2_mode=l2_mode,
                    temperature=temperature,
                    user_exponent=user_exponent,
                    recency_half_life=recency_half_life,
                    memory_mb=memory_mb,
                    negatives=negatives,
                    sampler=sampler,
                    eval_every=eval_every,
                    threads=threads,
                    top_k=top_k,
                    seed=seed,
                    on=on,
                    export_dir=export_dir,
                    nproc=nproc,
                )
            },
        )
        summary = run_train(config=resolved, console=_console(quiet, as_json))
        # Under torchrun every rank runs this command; rank 0 speaks for the run.
        if os.environ.get("RANK", "0") == "0":
            _emit(summary, as_json)

    _guard(action)


@app.command()
def export(
    db: DbOpt = None,
    run_id: Annotated[str, typer.Option(help="Run to export: an id or 'latest'.")] = "latest",
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Re-export a trained run to its folder's model.onnx (train already does this)."""
    from mfbatch.config import load_config
    from mfbatch.stages.export import export_run

    def action() -> None:
        resolved = load_config(config, db=db)
        path = export_run(db_path=resolved.db, run_id=run_id)
        typer.echo(json.dumps({"exported": str(path)}) if as_json else f"exported {path}")

    _guard(action)


@app.command()
def score(
    db: DbOpt = None,
    run_id: Annotated[
        str | None,
        typer.Option(help="Run to serve: an id, or 'latest' (the newest refit, else validated)."),
    ] = None,
    top_k: Annotated[int | None, typer.Option(help="Items per user (20).")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Users per batch (default: sized from --memory-mb).")
    ] = None,
    memory_mb: Annotated[
        int | None, typer.Option(help="Memory budget for one batch (512).")
    ] = None,
    provider: Annotated[
        str | None, typer.Option(help="auto (CUDA when present), cuda or cpu.")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime threads (all cores).")] = None,
    users: Annotated[
        Path | None,
        typer.Option(help="File of user ids (one per line): update only their lists."),
    ] = None,
    include_items: Annotated[
        Path | None, typer.Option(help="File of item ids: recommend only these.")
    ] = None,
    exclude_items: Annotated[
        Path | None, typer.Option(help="File of item ids: never recommend these.")
    ] = None,
    keep_history: Annotated[
        int | None, typer.Option(help="Publishes kept in recommendation_history (7).")
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(help="Also write the lists to a .parquet/.csv file or a Parquet folder."),
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(help="default (this process) or ray (user shards over Ray actors)."),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(help="ray: 'auto' or host:port of a cluster (default: a local Ray)."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="ray: scoring actors (2), one ONNX session each.")
    ] = None,
    gpus_per_worker: Annotated[
        float | None, typer.Option(help="ray: GPUs per actor (0); CUDA provider when > 0.")
    ] = None,
    parts_dir: Annotated[
        Path | None, typer.Option(help="ray: keep the Parquet parts (one per shard) here.")
    ] = None,
    publish: Annotated[
        bool | None,
        typer.Option(
            "--publish/--no-publish",
            help="ray: publish into DuckDB (default), or leave the Parquet parts as the output.",
        ),
    ] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Serve: top-K items each user has not rated (any split), published as recommendations."""
    from mfbatch.config import load_config
    from mfbatch.stages.score import score as run_score

    def action() -> None:
        resolved = load_config(
            config,
            db=db,
            overrides={
                "score": _overrides(
                    run_id=run_id,
                    top_k=top_k,
                    batch_size=batch_size,
                    memory_mb=memory_mb,
                    provider=provider,
                    threads=threads,
                    users=users,
                    include_items=include_items,
                    exclude_items=exclude_items,
                    keep_history=keep_history,
                    output=output,
                    engine=engine,
                    ray_address=ray_address,
                    workers=workers,
                    gpus_per_worker=gpus_per_worker,
                    parts_dir=parts_dir,
                    publish=publish,
                )
            },
        )
        _emit(run_score(config=resolved, console=_console(quiet, as_json)), as_json)

    _guard(action)


@app.command()
def evaluate(
    db: DbOpt = None,
    run_id: Annotated[
        str | None,
        typer.Option(help="Validated run to measure: an id or 'latest' (newest validated)."),
    ] = None,
    top_k: Annotated[int | None, typer.Option(help="K of the lists and metrics (20).")] = None,
    min_rating: Annotated[
        float | None,
        typer.Option(help="Count only validation ratings >= this (stars) as relevant."),
    ] = None,
    provider: Annotated[
        str | None, typer.Option(help="auto (CUDA when present), cuda or cpu.")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime threads (all cores).")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Measure the validated run on its own top-K lists vs popularity (never the served table)."""
    from rich.table import Table

    from mfbatch.config import load_config
    from mfbatch.stages.evaluate import evaluate as run_evaluate

    def action() -> Any:
        resolved = load_config(
            config,
            db=db,
            overrides={
                "evaluate": _overrides(run_id=run_id, top_k=top_k, min_rating=min_rating),
                "score": _overrides(provider=provider, threads=threads),
            },
        )
        return run_evaluate(config=resolved, console=_console(quiet, as_json))

    result = _guard(action)
    if as_json:
        typer.echo(result.to_json())
        return
    if quiet:
        typer.echo(result.line())
        return
    table = Table(title=f"run {result.run_id}, K={result.k}")
    for column in ("metric", "mfbatch", "popularity", "lift"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for row in result.rows():
        value, base = row["value"], row["baseline_value"]
        metric = row["metric"]
        name = metric + (f"@{row['k']}" if row["k"] and metric in _AT_K else "")
        lift = f"{value / base:.2f}x" if value and base and metric in _AT_K else ""
        table.add_row(name, _fmt(value, metric), _fmt(base, metric), lift)
    Console().print(table)
    typer.echo(result.line())


_AT_K = ("precision", "recall", "recall_uncapped", "ndcg", "map", "hit_rate")


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if metric.startswith("users_") else f"{value:.4f}"


@app.command()
def recommend(
    user: Annotated[str, typer.Option("--user", help="Raw user id, as in the users table.")],
    db: DbOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """One user's served list beside their own top-rated items."""
    from rich.table import Table

    from mfbatch.config import load_config
    from mfbatch.stages.recommend import recommend as run_recommend

    report = _guard(lambda: run_recommend(db_path=load_config(config, db=db).db, user_id=user))
    if as_json or quiet:
        _emit(report, as_json)
        return
    out = Console()
    recs = Table(title=f"recommended for user {report.user_id} (run {report.run_id})")
    for column in ("rank", "item", "title", "genres", "score", "source"):
        recs.add_column(column)
    for rec in report.recommendations:
        recs.add_row(
            str(rec.rank),
            rec.item_id,
            rec.title or "",
            rec.genres or "",
            f"{rec.score:.3f}",
            rec.source,
        )
    rated = Table(title=f"their top-rated ({report.n_ratings:,} ratings)")
    for column in ("item", "title", "rating", "split"):
        rated.add_column(column)
    for item in report.top_rated:
        rated.add_row(item.item_id, item.title or "", f"{item.rating:g}", item.split)
    out.print(recs)
    out.print(rated)
    typer.echo(report.line())


@app.command()
def runs(
    db: DbOpt = None,
    config: ConfigOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the runs as one JSON array.")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Every training run: what it is, how it measured, whether it is served."""
    from rich.table import Table

    from mfbatch.config import load_config
    from mfbatch.store.runs import list_runs

    path = _guard(lambda: load_config(config, db=db).db)
    listing = _guard(lambda: list_runs(db_path=path))
    if as_json:
        typer.echo(json.dumps(_plain(listing)))
        return
    if not quiet:
        table = Table(title="training runs, newest first")
        # The id is what a user copies into --run-id: never truncated.
        table.add_column("run", no_wrap=True, min_width=22)
        for column in ("objective", "data", "status", "epochs", "Recall", "NDCG", "RMSE"):
            table.add_column(column, overflow="fold")
        table.add_column("served", overflow="fold")
        for run in listing:
            served = ", ".join(
                part
                for part in (
                    "promoted" if run.promoted else "",
                    f"{run.served_users:,} users" if run.served_users else "",
                    "" if run.current_data else "other data",
                )
                if part
            )
            table.add_row(
                run.run_id,
                run.objective,
                run.data_seen,
                run.status,
                f"{run.best_epoch}/{run.epochs_run}",
                "-" if run.val_recall is None else f"{run.val_recall:.4f}",
                "-" if run.val_ndcg is None else f"{run.val_ndcg:.4f}",
                "-" if run.val_rmse is None else f"{run.val_rmse:.4f}",
                served or "-",
            )
        Console().print(table)
    typer.echo(f"{len(listing)} runs in {path}")


@app.command()
def serve(
    run_id: Annotated[
        str | None, typer.Option(help="The run `score` serves by default from now on.")
    ] = None,
    clear: Annotated[
        bool, typer.Option("--clear", help="Serve the newest refit again (the default).")
    ] = False,
    db: DbOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Choose the run `mfbatch score` serves (instead of the newest refit)."""
    from mfbatch.config import load_config
    from mfbatch.errors import ConfigError
    from mfbatch.stages.serve import promote

    def action() -> str:
        if (run_id is None) == (not clear):
            raise ConfigError("serve: pass --run-id ID to promote a run, or --clear")
        path = load_config(config, db=db).db
        run = promote(db_path=path, run_id=run_id)
        if run is None:
            return f"{path}: score serves the newest refit again"
        return f"{path}: score now serves run {run.run_id} ({run.data_seen})"

    line = _guard(action)
    typer.echo(json.dumps({"serving": run_id}) if as_json else line)


@app.command()
def diff(
    before: Annotated[int | None, typer.Option(help="Earlier publish (default: previous).")] = None,
    after: Annotated[int | None, typer.Option(help="Later publish (default: newest).")] = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    show: Annotated[int, typer.Option(help="Items entered/left to list (10).")] = 10,
) -> None:
    """What changed between two nights' served lists (users, items entered and left)."""
    from mfbatch.config import load_config
    from mfbatch.store.history import diff as run_diff

    result = _guard(
        lambda: run_diff(db_path=load_config(config, db=db).db, before=before, after=after)
    )
    if not as_json:
        for label, items in (("entered", result.items_entered), ("left", result.items_left)):
            if items:
                more = f" (+{len(items) - show:,} more)" if len(items) > show else ""
                typer.echo(f"items {label}: {', '.join(items[:show])}{more}")
    _emit(result, as_json)


@app.command("export-lists")
def export_lists(
    output: Annotated[
        Path, typer.Option(help="A .parquet or .csv file, or a folder (Parquet by run_id).")
    ],
    publish: Annotated[
        int | None, typer.Option(help="A kept publish instead of the current lists.")
    ] = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write the served lists (raw ids, rank, score, source, run id) for a warehouse."""
    from mfbatch.config import load_config
    from mfbatch.store.history import export_lists as run_export

    path, rows = _guard(
        lambda: run_export(db_path=load_config(config, db=db).db, out=output, publish=publish)
    )
    summary = {"output": str(path), "rows": rows}
    typer.echo(json.dumps(summary) if as_json else f"wrote {rows:,} rows to {path}")


@app.command()
def report(
    out: Annotated[Path, typer.Option(help="The HTML file to write.")] = Path("report.html"),
    run_id: Annotated[
        str, typer.Option(help="Validated run: an id or 'latest' (newest validated).")
    ] = "latest",
    db: DbOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One offline HTML page: training curves, metrics vs popularity, long tail, scores."""
    from mfbatch.config import load_config
    from mfbatch.stages.report import report as run_report

    summary = _guard(
        lambda: run_report(db_path=load_config(config, db=db).db, out=out, run_id=run_id)
    )
    _emit(summary, as_json)


def _check_append(source: Path | None, *split_flags: object) -> None:
    from mfbatch.errors import ConfigError

    if source is None:
        raise ConfigError("--append: name the file of new ratings with --source FILE")
    if any(flag is not None for flag in split_flags):
        raise ConfigError(
            "--append: the split was made at preprocess and stays as it was; "
            "drop --split/--val-fraction/--seed"
        )


def _without_time(resolved: Any) -> Any:
    import dataclasses

    return dataclasses.replace(resolved, data=dataclasses.replace(resolved.data, time_col=None))


def main() -> None:  # pragma: no cover - console-script shim
    app(prog_name="mfbatch")


if __name__ == "__main__":  # pragma: no cover
    main()
