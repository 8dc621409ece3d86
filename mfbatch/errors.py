"""The few domain errors mfbatch raises.

Library code raises these with a one-line message that names the file, table or argument
at fault and says how to fix it. Only the CLI turns them into exit codes, so library
callers (tests, notebooks) get ordinary exceptions.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """A library exception's message cut to its first line, for our one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class MfbatchError(Exception):
    """Base class: a user-facing failure with a one-line message."""

    exit_code = 1


class ConfigError(MfbatchError):
    """An option or config value that makes no sense (bad range, unknown name)."""

    exit_code = 2


class InputDataError(MfbatchError):
    """A source file that is missing, empty, malformed or not in the expected layout."""

    exit_code = 3


class DatabaseError(MfbatchError):
    """The DuckDB file is locked, missing a table the stage needs, or could not be written."""

    exit_code = 4


class ModelError(MfbatchError):
    """A model that is missing, does not match the database, or failed to train."""

    exit_code = 5
