"""The `mfbatch` command line: thin Typer commands over one library function each.

Library code raises `MfbatchError`s; this module alone turns them into a one-line message
on stderr and an exit code, so a user error never shows a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from mfbatch.errors import MfbatchError

app = typer.Typer(
    name="mfbatch",
    help="Batch matrix-factorization recommender: preprocess -> train -> score -> evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
T = TypeVar("T")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="TOML file with [data]/[split]/... tables.")
]
DbOpt = Annotated[
    Path | None, typer.Option("--db", help="DuckDB file to write (default mfbatch.duckdb).")
]


@app.callback()
def _root() -> None:
    """Batch matrix-factorization recommender: preprocess -> train -> score -> evaluate."""


def _guard(action: Callable[[], T]) -> T:
    """Run a library call; user errors become one line on stderr and a non-zero exit."""
    try:
        return action()
    except MfbatchError as exc:
        console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
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
    config: ConfigOpt = None,
) -> None:
    """Read ratings, map ids, scale to [0,1], split train/val, write DuckDB tables."""
    from mfbatch.config import load_config
    from mfbatch.preprocess import preprocess as run_preprocess

    def action() -> None:
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
            },
        )
        if time_col == "":
            resolved = _without_time(resolved)
        summary = run_preprocess(config=resolved, console=console)
        typer.echo(summary.line())

    _guard(action)


def _without_time(resolved: Any) -> Any:
    import dataclasses

    return dataclasses.replace(resolved, data=dataclasses.replace(resolved.data, time_col=None))


def main() -> None:  # pragma: no cover - console-script shim
    app(prog_name="mfbatch")


if __name__ == "__main__":  # pragma: no cover
    main()
