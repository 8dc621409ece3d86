"""The `mfbatch` command line: thin Typer commands over one library function each.

The config-backed commands (preprocess, train, score, evaluate) take their options from
the typed sections in `mfbatch.config`; `mfbatch.cli_options` builds them. Only this layer
maps errors to exit codes (`guard`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from mfbatch.cli_options import (
    ConfigOpt,
    DbOpt,
    JsonOpt,
    QuietOpt,
    config_command,
    emit,
    exit_promptly,
    guard,
    plain,
    progress_console,
    result_console,
)

# Typer labels every flag `<bool>` in --help; a flag takes no value, so show none.
_display_type = typer.core.TyperOption.display_type_rich


def _flag_display_type(self: typer.core.TyperOption, ctx: Any) -> str | None:
    return "" if self.is_flag and not self.count else _display_type(self, ctx)


typer.core.TyperOption.display_type_rich = _flag_display_type  # type: ignore[method-assign]

app = typer.Typer(
    name="mfbatch",
    help="Batch matrix-factorization recommender: preprocess -> train -> evaluate -> score.",
    no_args_is_help=True,
    # --install-completion / --show-completion: bash, zsh, fish, PowerShell.
    add_completion=True,
    pretty_exceptions_enable=False,
)


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


def _preprocess_extra(
    db: DbOpt = None,
    append: Annotated[
        bool,
        typer.Option(
            "--append",
            help="Add --source's ratings to the existing --db (ids kept, new ones appended, "
            "split left as it was) instead of replacing it; with --items-source and no "
            "--source, refresh only the item metadata.",
        ),
    ] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Read ratings, map ids, scale to [0,1], split train/val, write DuckDB tables."""


def _preprocess(overrides: dict[str, dict[str, Any]], opts: dict[str, Any]) -> None:
    from mfbatch.config import load_config
    from mfbatch.errors import ConfigError

    def action() -> None:
        if opts["append"]:
            # Neither --source nor --items-source: the stage refuses, naming both.
            if any(v is not None for v in overrides["split"].values()):
                raise ConfigError(
                    "--append: the split was made at preprocess and stays as it was; "
                    "drop --split/--val-fraction/--seed"
                )
            if overrides["preprocess"].get("memory_mb") is not None:
                raise ConfigError("--memory-mb: --append reads its file in memory; drop it")
        resolved = load_config(opts["config"], db=opts["db"], overrides=overrides)
        if opts["append"]:
            from mfbatch.stages.append import append as run_append

            emit(run_append(config=resolved), opts["as_json"])
            return
        from mfbatch.stages.preprocess import preprocess as run_preprocess

        console = progress_console(opts["quiet"], opts["as_json"])
        emit(run_preprocess(config=resolved, console=console), opts["as_json"])

    guard(action)


config_command(app, "preprocess", ("data", "split", "preprocess"), _preprocess_extra, _preprocess)


def _run_stage(stage: str, section: str) -> Any:
    def run(overrides: dict[str, dict[str, Any]], opts: dict[str, Any]) -> None:
        import importlib

        from mfbatch.config import load_config

        module = importlib.import_module(f"mfbatch.stages.{stage}")

        def action() -> Any:
            resolved = load_config(opts["config"], db=opts["db"], overrides=overrides)
            console = progress_console(opts["quiet"], opts["as_json"])
            return getattr(module, stage)(config=resolved, console=console)

        summary = guard(action)
        if stage == "evaluate" and not (opts["as_json"] or opts["quiet"]):
            from mfbatch.cli_render import evaluation_table

            result_console().print(evaluation_table(summary))
        if stage == "evaluate" and opts["as_json"]:
            typer.echo(summary.to_json())
        # Under torchrun every rank runs `train`; rank 0 speaks for the run.
        elif os.environ.get("RANK", "0") == "0":
            emit(summary, opts["as_json"])

    return run


def _documented(doc: str) -> Any:
    def extra(
        db: DbOpt = None,
        config: ConfigOpt = None,
        as_json: JsonOpt = False,
        quiet: QuietOpt = False,
    ) -> None:
        pass

    extra.__doc__ = doc
    return extra


config_command(
    app,
    "train",
    ("train",),
    _documented("Train the MF model on the train split, early-stop on val, save export/<run_id>/."),
    _run_stage("train", "train"),
)
config_command(
    app,
    "score",
    ("score",),
    _documented(
        "Serve: top-K items each user has not rated (any split), published as recommendations."
    ),
    _run_stage("score", "score"),
)
config_command(
    app,
    "evaluate",
    ("evaluate",),
    _documented(
        "Measure the validated run on its own top-K lists vs popularity (never the served table)."
    ),
    _run_stage("evaluate", "evaluate"),
)

# `mfbatch tune`: its [tune] options on the command line; what it starts from is [train].
config_command(
    app,
    "tune",
    ("tune",),
    _documented(
        "Search train settings (Optuna) on an inner split of train; `train` then applies the "
        "best below its flags."
    ),
    _run_stage("tune", "tune"),
)


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

    guard(action)


@app.command()
def recommend(
    user: Annotated[
        list[str],
        typer.Option(
            "--user", metavar="ID", help="Raw user id, as in the users table; repeat for several."
        ),
    ],
    top: Annotated[
        int | None,
        typer.Option("--top", "-n", help="Show the first N of each list (default: all of it)."),
    ] = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Users' served lists, each beside the user's own top-rated items."""
    from mfbatch.config import load_config
    from mfbatch.errors import ConfigError
    from mfbatch.stages.recommend import recommend as run_recommend

    def action() -> list[Any]:
        if top is not None and top < 1:
            raise ConfigError(f"--top/-n: must be at least 1, got {top}")
        path = load_config(config, db=db).db
        # Every user is checked before any list is printed: no half answer.
        return [
            run_recommend(db_path=path, user_id=u, n=top, limit=top or 20)
            for u in dict.fromkeys(user)
        ]

    reports = guard(action)
    if as_json:
        typer.echo(json.dumps(plain(reports[0] if len(reports) == 1 else {"users": reports})))
        return
    from mfbatch.cli_render import recommendation_tables

    out = result_console()
    for report in reports:
        if not quiet:
            for table in recommendation_tables(report):
                out.print(table)
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
    from mfbatch.config import load_config
    from mfbatch.store.runs import list_runs

    path = guard(lambda: load_config(config, db=db).db)
    listing = guard(lambda: list_runs(db_path=path))
    if as_json:
        typer.echo(json.dumps(plain(listing)))
        return
    if not quiet:
        from mfbatch.cli_render import runs_table

        result_console().print(runs_table(listing))
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
    quiet: QuietOpt = False,
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

    line = guard(action)
    typer.echo(json.dumps({"serving": run_id}) if as_json else line)


@app.command()
def diff(
    before: Annotated[int | None, typer.Option(help="Earlier publish (default: previous).")] = None,
    after: Annotated[int | None, typer.Option(help="Later publish (default: newest).")] = None,
    db: DbOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    show: Annotated[int, typer.Option(help="Items entered/left to list.")] = 10,
    quiet: QuietOpt = False,
) -> None:
    """What changed between two nights' served lists (users, items entered and left)."""
    from mfbatch.config import load_config
    from mfbatch.store.history import diff as run_diff

    result = guard(
        lambda: run_diff(db_path=load_config(config, db=db).db, before=before, after=after)
    )
    if not (as_json or quiet):
        for label, items in (("entered", result.items_entered), ("left", result.items_left)):
            if items:
                more = f" (+{len(items) - show:,} more)" if len(items) > show else ""
                typer.echo(f"items {label}: {', '.join(items[:show])}{more}")
    emit(result, as_json)


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
    quiet: QuietOpt = False,
) -> None:
    """Write the served lists (raw ids, rank, score, source, run id) for a warehouse."""
    from mfbatch.config import load_config
    from mfbatch.store.history import export_lists as run_export

    def action() -> tuple[Path, int]:
        resolved = load_config(config, db=db)
        return run_export(
            db_path=resolved.db,
            out=output,
            publish=publish,
            export_dir=resolved.train.export_dir,
        )

    path, rows = guard(action)
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
    quiet: QuietOpt = False,
) -> None:
    """One offline HTML page: training curves, metrics vs popularity, long tail, scores."""
    from mfbatch.config import load_config
    from mfbatch.stages.report import report as run_report

    def action() -> Any:
        resolved = load_config(config, db=db)
        return run_report(
            db_path=resolved.db, out=out, run_id=run_id, export_dir=resolved.train.export_dir
        )

    summary = guard(action)
    emit(summary, as_json)


def main() -> None:
    """The console script and `python -m mfbatch` (see `exit_promptly`)."""
    exit_promptly(app, "mfbatch")


if __name__ == "__main__":  # pragma: no cover
    main()
