"""Every command's option names, against a committed snapshot (tests/data/cli_options.json).

The package is being re-laid out; its commands must keep exactly the options they have.
A flag pair such as `--batch-norm/--no-batch-norm` counts as two names, and a short alias
(`-k`) as its own name. An intended change of options regenerates the snapshot:

    python tests/test_cli_options.py > tests/data/cli_options.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from mfbatch.cli import app

SNAPSHOT = Path(__file__).resolve().parent / "data" / "cli_options.json"
COMMANDS = {
    "preprocess",
    "train",
    "export",
    "score",
    "evaluate",
    "recommend",
    "runs",
    "serve",
    "diff",
    "export-lists",
    "report",
}


def cli_options() -> dict[str, list[str]]:
    """{command path: sorted option names} for every (sub)command of the live CLI."""
    found: dict[str, list[str]] = {}

    # Duck-typed: Typer may bring its own copy of click's classes (typer._click).
    def walk(command: Any, path: str) -> None:
        names: set[str] = set()
        for param in command.params:
            if param.param_type_name == "option":
                names.update(param.opts)
                names.update(param.secondary_opts)
        found[path] = sorted(names)
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}".strip())

    walk(typer.main.get_command(app), "")
    return found


def test_every_command_keeps_its_options() -> None:
    live = cli_options()
    stored = json.loads(SNAPSHOT.read_text(encoding="utf-8"))
    assert set(live) >= COMMANDS, sorted(COMMANDS - set(live))
    problems = []
    for command in sorted(set(live) | set(stored)):
        now, then = set(live.get(command, [])), set(stored.get(command, []))
        if command not in live:
            problems.append(f"command {command!r} removed")
        elif command not in stored:
            problems.append(f"command {command!r} added, with {sorted(now)}")
        elif now != then:
            added, removed = sorted(now - then), sorted(then - now)
            problems.append(f"{command or 'mfbatch'}: added {added}, removed {removed}")
    assert not problems, "options changed:\n" + "\n".join(problems)


if __name__ == "__main__":
    json.dump(cli_options(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
