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


def idle_cores(cores: int, window_s: float = 0.2) -> float:
    """How many of the machine's cores sat idle over a short window (/proc/stat)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    try:
        idle_a, total_a = sample()
        time.sleep(window_s)
        idle_b, total_b = sample()
    except (OSError, ValueError, IndexError):
        return float(cores)
    machine = os.cpu_count() or cores
    return machine * (idle_b - idle_a) / max(total_b - total_a, 1)


def resolve_threads(requested: int | None) -> tuple[int, str | None]:
    """(threads, note). Never more than the cores this process may run on; by default
    only the cores that are idle now, because torch's threads wait for each other at
    every op: with one of two cores busy, two threads ran ~9x slower than one
    (README, "The model")."""
    cores = usable_cores()
    if requested is not None:
        if requested > cores:
            return cores, f"--threads {requested}: capped at the {cores} cores available"
        return requested, None
    return max(1, min(cores, math.floor(idle_cores(cores) + 0.5))), None
