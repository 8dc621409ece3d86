"""How many cores this process may use: the one answer every room asks for.

Its own module, below the config: the serving path sizes its thread pools with it and
must not import the typed options (pydantic) to ask.
"""

from __future__ import annotations

import os


def machine_cores() -> int:
    """Cores this process may run on (cgroup/affinity aware where the OS says)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1
