"""Bounded resources: process, actor and GPU counts the machine can't hold, and a Ray
address nobody answers, are refused in one line within seconds (issue 20)."""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FAST, Workspace, assert_user_error, cli

from mfbatch.config import machine_cores


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_nproc_beyond_the_cores_is_refused(good_db: Path) -> None:
    before = _hashes(good_db.parent)
    many = max(2, machine_cores()) + 1
    run = cli("train", "--db", good_db, "--nproc", many, "--export-dir", good_db.parent / "x")
    assert_user_error(run, 2, "--nproc", f"{many} processes", f"at most {max(2, machine_cores())}")
    assert _hashes(good_db.parent) == before


def test_local_ray_workers_beyond_the_cores_are_refused(good_db: Path) -> None:
    before = _hashes(good_db.parent)
    run = cli("score", "--db", good_db, "--engine", "ray", "--workers", 126)
    assert_user_error(run, 2, "--workers", "126 actors", "--ray-address")
    assert _hashes(good_db.parent) == before


@pytest.mark.parametrize("address", ["nowhere", "host:port", "ray://h:0", ":6379"])
def test_a_malformed_ray_address_is_refused(good_db: Path, address: str) -> None:
    run = cli("score", "--db", good_db, "--engine", "ray", "--ray-address", address)
    assert_user_error(run, 2, "--ray-address", address)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A local port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    yield port


def test_an_unreachable_ray_address_fails_within_seconds(ws: Workspace, closed_port: int) -> None:
    pytest.importorskip("ray")
    before = _hashes(ws.root)
    started = time.perf_counter()
    address = f"127.0.0.1:{closed_port}"
    run = ws.score("--engine", "ray", "--ray-address", address)
    assert_user_error(run, 2, "--ray-address", address, "does not answer")
    # Ray's own retries ran for minutes; the probe gives up after 5 s (60: a loaded CI box).
    assert time.perf_counter() - started < 60
    assert _hashes(ws.root) == before


@pytest.mark.slow
def test_gpus_per_worker_without_gpus_is_refused(ws: Workspace) -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        before = _hashes(ws.root)
        run = cli("score", "--db", ws.db, *FAST, "--engine", "ray", "--gpus-per-worker", 1,
                  allow_traceback=True)  # fmt: skip
        assert_user_error(run, 2, "--gpus-per-worker", "has 0")
        assert _hashes(ws.root) == before
    finally:
        ray.shutdown()
