"""The command line's plumbing: options built from the typed config, one error path.

A config-backed command declares which sections it takes; every CLI-visible field of those
sections becomes an option with the field's flag, type and documentation (its default in
the help), so an option is declared once, in `mfbatch.config`. Library code raises
`MfbatchError`s; `guard` alone turns them into one line on stderr and an exit code.
"""

from __future__ import annotations

import atexit
import dataclasses
import inspect
import json
import os
import sys
import types
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, TypeVar, Union, get_args, get_origin

import typer
from pydantic_core import PydanticUndefined
from rich.console import Console
from rich.markup import escape

from mfbatch.config import SECTIONS
from mfbatch.config.base import flag_name
from mfbatch.errors import MfbatchError
from mfbatch.progress import log_console

T = TypeVar("T")
# Errors: one line that starts with "error:", unwrapped (what scripts and tests grep for).
console = log_console(stamped=False)
# Progress and notes: stamped with their time off a terminal (logs). They name files, ids
# and runs: plain text, never Rich markup, so `[/]` or `[bold red]x` prints as written.
notes = log_console(markup=False)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="TOML config file (tables data, split, train, score, ...)."),
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


def _cli_type(annotation: Any) -> type:
    """The type the command line parses a field as (the model checks choices and ranges)."""
    arms = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else ()
    for arm in arms or (annotation,):
        if arm is type(None):
            continue
        base = get_args(arm)[0] if get_origin(arm) is Annotated else arm
        if get_origin(base) is Literal:
            return str
        if base in (bool, int, float, Path, str):
            return base
    return str


def _choices(annotation: Any) -> list[str]:
    arms = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else ()
    for arm in arms or (annotation,):
        if get_origin(arm) is Literal:
            return [str(a) for a in get_args(arm)]
    return []


def _help(default: Any, description: str) -> str:
    """The field's documentation and its default, unless the text already says it (defaults
    that depend on the objective or the data). The bracket is escaped: help is rich markup."""
    if default in (None, PydanticUndefined):
        return description
    if isinstance(default, bool):
        default = "on" if default else "off"
    return description if "(default" in description else f"{description} \\[default: {default}]"


def section_params(section: str) -> list[inspect.Parameter]:
    """One keyword parameter per CLI-visible field of `section`, named section__field."""
    params = []
    for name, field in SECTIONS[section].model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("cli") is False:
            continue
        flag = str(extra.get("flag") or flag_name(name))
        kind = _cli_type(field.annotation)
        choices = _choices(field.annotation)
        description = field.description or ""
        option = typer.Option(
            flag,
            help=_help(field.default, description),
            show_default=False,
            metavar="|".join(choices) if choices else None,
        )
        params.append(
            inspect.Parameter(
                f"{section}__{name}",
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[kind | None, option],
            )
        )
    return params


def config_command(
    app: typer.Typer,
    name: str,
    sections: tuple[str, ...],
    extra: Callable[..., None],
    run: Callable[[dict[str, dict[str, Any]], dict[str, Any]], None],
) -> None:
    """Register `name`: the sections' options plus `extra`'s own parameters (and its doc);
    `run(overrides, plain)` gets the section values given and the other parameters."""
    own = list(inspect.signature(extra, eval_str=True).parameters.values())
    params = [p for s in sections for p in section_params(s)]
    params += [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]

    def command(**kwargs: Any) -> None:
        overrides: dict[str, dict[str, Any]] = {s: {} for s in sections}
        plain: dict[str, Any] = {}
        for key, value in kwargs.items():
            section, _, field = key.partition("__")
            if field:
                overrides[section][field] = value
            else:
                plain[key] = value
        run(overrides, plain)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = extra.__doc__
    command.__name__ = name.replace("-", "_")
    app.command(name)(command)


def plain(value: Any) -> Any:
    """A summary as JSON-able data: dataclasses to dicts, paths and times to strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def emit(summary: Any, as_json: bool) -> None:
    """Every command's last line: its one-line summary, or the summary as one JSON object."""
    typer.echo(json.dumps(plain(summary)) if as_json else summary.line())


def progress_console(quiet: bool, as_json: bool) -> Console | None:
    # No console: the library prints no progress and no notes.
    return None if quiet or as_json else notes


def result_console() -> Console:
    """Where a command's tables go (stdout): never wrapped at 80 columns in a log."""
    return log_console(stderr=False, stamped=False)


def guard(action: Callable[[], T]) -> T:
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


def exit_promptly(app: typer.Typer, name: str) -> NoReturn:
    """Run the command line, then end the process with the command's exit code.

    When a command returns, its database is closed and its result printed; the
    interpreter's teardown after that (clearing every module, the native libraries'
    destructors) measured 0.2-0.3 s of each `mfbatch score` on top of the work. The exit
    handlers still run (Ray's shutdown, temporary files) and the streams are flushed.
    """
    try:
        app(prog_name=name)
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:  # sys.exit("message"): printed, status 1, as the interpreter would
            print(exc.code, file=sys.stderr)
            code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`): nothing more to say
            code = code or 1
    os._exit(code)
