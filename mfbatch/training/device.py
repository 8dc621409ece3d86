"""Where training runs: the device, and how many CPU threads are worth using now."""

from __future__ import annotations

import math
import os
import time

import torch

from mfbatch.errors import ConfigError


def resolve_device(requested: str) -> torch.device:
    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise ConfigError(
            f"--device cuda: CUDA is not available to torch {torch.__version__}; "
            "use --device cpu or --device auto"
        )
    return torch.device(
        "cuda" if requested == "cuda" or (requested == "auto" and available) else "cpu"
    )


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    n = torch.get_num_threads()
    return f"cpu ({n} thread{'' if n == 1 else 's'})"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cpu_sample() -> tuple[int, int] | None:
    """(idle + iowait, total) jiffies of the whole machine, from /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)
    except (OSError, ValueError, IndexError):
        return None


class IdleWindow:
    """How many cores sit idle over a window that opens here and closes at `idle()`.

    Opened before a run's own start-up (reading the ratings, building tensors), so the
    window mostly overlaps that work instead of being a wait of its own; this process's
    CPU time in the window is counted back as idle, since those cores are free for the
    training that follows.
    """

    def __init__(self) -> None:
        self._start = _cpu_sample()
        self._cpu = time.process_time()
        self._wall = time.monotonic()

    def idle(self, cores: int, window_s: float = 0.2) -> float:
        wait = window_s - (time.monotonic() - self._wall)
        if wait > 0:
            time.sleep(wait)
        end = _cpu_sample()
        if self._start is None or end is None:
            return float(cores)
        machine = os.cpu_count() or cores
        others_idle = machine * (end[0] - self._start[0]) / max(end[1] - self._start[1], 1)
        own = (time.process_time() - self._cpu) / max(time.monotonic() - self._wall, 1e-9)
        return min(float(machine), others_idle + own)


def idle_cores(cores: int, window_s: float = 0.2) -> float:
    """How many of the machine's cores sat idle over a short window (/proc/stat)."""
    return IdleWindow().idle(cores, window_s)


def resolve_threads(
    requested: int | None, window: IdleWindow | None = None
) -> tuple[int, str | None]:
    """(threads, note). Never more than the cores this process may run on; by default
    only the cores that are idle now (over `window`, opened earlier, or 0.2 s from now),
    because torch's threads wait for each other at every op: with one of two cores busy,
    two threads ran ~9x slower than one (README, "The model")."""
    cores = usable_cores()
    if requested is not None:
        if requested > cores:
            return cores, f"--threads {requested}: capped at the {cores} cores available"
        return requested, None
    idle = (window or IdleWindow()).idle(cores)
    return max(1, min(cores, math.floor(idle + 0.5))), None
