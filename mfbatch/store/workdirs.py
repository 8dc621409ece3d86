"""Scratch folders beside the database (score's spool, out-of-core preprocess buckets).

Each holds an `owner.pid`; a folder whose owner is gone was left by a process killed
outright (SIGKILL, OOM killer, power loss), and the next run of the same stage removes it.
A folder without that file is not provably the tool's (a user's folder may share the
prefix): it is removed only when empty and over a minute old (a run killed between
creating it and writing its owner), never when it holds anything.
They live beside the database, not in /tmp, so they are on the disk that has room for it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

OWNER_FILE = "owner.pid"
# A folder with no owner file yet may be one another process has just created: only an
# empty one older than this is taken for a leftover.
UNOWNED_GRACE_S = 60.0


def make(folder: Path, prefix: str) -> Path:
    """A new scratch folder in `folder`, owned by this process."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=folder))
    (work / OWNER_FILE).write_text(str(os.getpid()))
    return work


def remove_stale(folder: Path, prefix: str) -> int:
    """Remove `prefix*` folders whose owner process is gone; returns how many."""
    removed = 0
    for work in folder.glob(prefix + "*"):
        if not work.is_dir() or work.is_symlink():
            continue
        try:
            pid = int((work / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            # Not provably ours (module docstring): an empty, old one holds nothing to lose.
            if _age(work) >= UNOWNED_GRACE_S and not any(work.iterdir()):
                work.rmdir()
                removed += 1
            continue
        if pid != os.getpid() and _alive(pid):
            continue
        shutil.rmtree(work, ignore_errors=True)
        removed += 1
    return removed


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
