"""Every path a command writes goes through here first: an output never replaces what it
did not write.

`check` runs before any work and refuses (a `ConfigError` naming the flag) a path that is
the database or its WAL, a folder holding the database, an export folder (a run folder,
the --export-dir root, or a folder holding run folders), the working directory or a
parent of it, or an existing file or folder that is not a previous output of the same
kind. A previous output is recognised (docs/operations.md, "Output paths") by:

- a lists folder: empty, or nothing but `run_id=*/` folders of Parquet parts whose columns are the
  list columns less run_id (no marker file: Polars refuses a folder with other files);
- a --parts-dir: a new or empty folder (the parts of a night are never overwritten);
- a .parquet / .csv list file: exactly the list columns (`LIST_COLUMNS`), in order;
- an HTML report: mfbatch's own `<meta name="generator" content="mfbatch ...">` tag.

`staged` then writes beside the target and renames into place, so a reader never sees
half an output, and removes the partial write on any failure.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mfbatch.errors import ConfigError, DatabaseError, first_line

GENERATOR = "mfbatch"  # <meta name="generator" content="mfbatch VERSION"> in reports
# The columns of every list export (history.LIST_SCHEMA's names; kept here so this module
# needs neither pyarrow nor the history module to recognise a previous export).
LIST_COLUMNS = (
    "run_id",
    "user_id",
    "item_id",
    "rank",
    "score",
    "predicted_rating",
    "source",
    "created_at",
)
# Files that mark a run folder (store.runs' MANIFEST_FILE and ONNX_FILE).
_RUN_FILES = ("manifest.json", "model.onnx")

Kind = Literal["lists-parquet", "lists-csv", "lists-folder", "report", "parts"]


@dataclass(frozen=True)
class Target:
    """A checked output path and what is written there."""

    path: Path
    kind: Kind
    flag: str

    @property
    def folder(self) -> bool:
        return self.kind in ("lists-folder", "parts")


def _is_run_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in _RUN_FILES)


def _holds_run_folders(path: Path) -> bool:
    try:
        return any(child.is_dir() and _is_run_folder(child) for child in path.iterdir())
    except OSError:
        return False


def _lists_folder(path: Path) -> bool:
    """Nothing but run_id=*/ folders of Parquet parts with the list columns (less run_id)."""
    import pyarrow.parquet as pq

    children = list(path.iterdir())
    if not children:
        return False
    for child in children:
        if not (child.is_dir() and child.name.startswith("run_id=")):
            return False
        for part in child.iterdir():
            if part.suffix != ".parquet" or tuple(pq.read_schema(part).names) != LIST_COLUMNS[1:]:
                return False
    return True


def _is_previous(path: Path, kind: Kind) -> bool:
    """Whether the existing `path` is an earlier output of this kind (module docstring)."""
    try:
        # An empty folder holds nothing to lose (a user may make it first).
        if kind == "parts":
            return path.is_dir() and not any(path.iterdir())
        if kind == "lists-folder":
            return path.is_dir() and (not any(path.iterdir()) or _lists_folder(path))
        if not path.is_file():
            return False
        if kind == "lists-parquet":
            import pyarrow.parquet as pq

            return tuple(pq.read_schema(path).names) == LIST_COLUMNS
        with path.open("rb") as handle:
            head = handle.read(4096).decode("utf-8", errors="replace")
    except Exception:  # anything unreadable is not ours: refused by the caller
        return False
    if kind == "lists-csv":
        return head.splitlines()[0].strip() == ",".join(LIST_COLUMNS) if head else False
    return f'<meta name="generator" content="{GENERATOR}' in head


def _refuse(flag: str, path: Path, why: str, fix: str) -> ConfigError:
    return ConfigError(f"{flag}: {path} {why}; {fix}; nothing was written")


def check(
    path: Path | str,
    *,
    flag: str,
    kind: Kind,
    db_path: Path,
    export_dir: Path | None = None,
) -> Target:
    """Refuse `path` unless writing `kind` there can only replace an earlier output."""
    raw = str(path)
    fix = "pass a new path (or an earlier output of this command)"
    if raw.strip() in ("", ".", ".."):
        raise _refuse(flag, Path(raw), "is empty, '.' or '..'", fix)
    target = Path(path).resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise _refuse(flag, Path(raw), "is the working directory or a folder above it", fix)
    database = db_path.resolve()
    if target in (database, database.with_name(database.name + ".wal")):
        raise _refuse(flag, Path(raw), f"is the database {db_path}", fix)
    if target in database.parents:
        raise _refuse(flag, Path(raw), f"holds the database {db_path}", fix)
    exports = export_dir.resolve() if export_dir is not None else None
    if exports is not None and (target == exports or target in exports.parents):
        raise _refuse(flag, Path(raw), f"is or holds the export folder {export_dir}", fix)
    if target.is_dir() and (_is_run_folder(target) or _holds_run_folders(target)):
        raise _refuse(flag, Path(raw), "is an export folder (trained runs)", fix)
    if target.exists() and not _is_previous(target, kind):
        what = "folder" if target.is_dir() else "file"
        raise _refuse(flag, Path(raw), f"is an existing {what} mfbatch did not write", fix)
    return Target(path=Path(path), kind=kind, flag=flag)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def staged(target: Target) -> Iterator[Path]:
    """A fresh path beside `target` to write into; renamed over it when the block ends.

    A folder swaps in by two renames (the earlier output aside, the new
    one in), so no moment lacks a whole output at the path. On any failure the partial
    write is removed and an OSError (or a writer's own error: Polars on a full disk) is
    one DatabaseError line.
    """
    out = target.path
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        prefix, suffix = f".{out.name}.", ".partial"
        if target.folder:
            staging = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=out.parent))
        else:
            handle, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=out.parent)
            os.close(handle)
            staging = Path(name)
    except OSError as exc:
        raise DatabaseError(
            f"{target.flag}: could not write beside {out} ({exc}); free space or pick another path"
        ) from None
    try:
        yield staging
        if target.folder:
            _swap_folder(staging, out)
        else:
            os.replace(staging, out)
    except BaseException as exc:
        _remove(staging)
        if isinstance(exc, (KeyboardInterrupt, SystemExit, ConfigError, DatabaseError)):
            raise
        raise DatabaseError(
            f"{target.flag}: writing {out} failed ({first_line(exc)}); free space or pick "
            "another path; nothing was replaced"
        ) from None


def _swap_folder(staging: Path, out: Path) -> None:
    if not out.exists():
        os.replace(staging, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    aside.rmdir()
    os.replace(out, aside)
    try:
        os.replace(staging, out)
    except OSError:
        os.replace(aside, out)  # the earlier output back where it was
        raise
    shutil.rmtree(aside, ignore_errors=True)
