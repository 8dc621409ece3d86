"""Fetching releases (mfbatch.data.download) from a real HTTP server on 127.0.0.1.

Only loopback addresses are used: a thread serves files from a temp folder, and an
unreachable URL is a port on 127.0.0.1 that was just closed.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Callable, Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import Preprocess

from mfbatch.data import download as dl
from mfbatch.errors import InputDataError


class Server:
    def __init__(self, root: Path, base: str) -> None:
        self.root = root
        self.base = base
        self.requests: list[str] = []


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    root = tmp_path / "served"
    root.mkdir()
    seen: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # quiet test output
            seen.append(self.path)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    served = Server(root, f"http://127.0.0.1:{httpd.server_address[1]}")
    served.requests = seen
    try:
        yield served
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens once the socket is closed


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def test_download_keeps_a_file_whose_md5_matches(
    server: Server, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    payload = bytes(range(256)) * 9000  # > 2 MiB: several read blocks
    (server.root / "ml-1m.zip").write_bytes(payload)
    target = tmp_path / "cache" / "nested" / "ml-1m.zip"
    dl.download(f"{server.base}/ml-1m.zip", target, md5=md5(payload))
    assert target.read_bytes() == payload
    assert dl.md5_file(target) == md5(payload)
    assert sorted(p.name for p in target.parent.iterdir()) == ["ml-1m.zip"]  # no .part left
    out, _ = capfd.readouterr()
    assert out == ""  # progress never goes to stdout, where the summary line is


def test_download_discards_a_file_whose_md5_differs(server: Server, tmp_path: Path) -> None:
    (server.root / "ml-1m.zip").write_bytes(b"tampered")
    target = tmp_path / "cache" / "ml-1m.zip"
    expected = md5(b"original")
    with pytest.raises(InputDataError) as caught:
        dl.download(f"{server.base}/ml-1m.zip", target, md5=expected)
    message = str(caught.value)
    assert "\n" not in message
    assert f"MD5 {md5(b'tampered')} does not match the published {expected}" in message
    assert "discarded" in message and "--source" in message
    assert list(target.parent.iterdir()) == []


def test_download_from_an_unreachable_address(closed_port: int, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port}/ml-1m.zip"
    target = tmp_path / "cache" / "ml-1m.zip"
    with pytest.raises(InputDataError) as caught:
        dl.download(url, target, md5="0" * 32, timeout=5)
    message = str(caught.value)
    assert "\n" not in message
    assert f"could not download {url}" in message
    assert "--source path/to/ml-1m.zip" in message
    assert list(target.parent.iterdir()) == []


def test_download_of_a_missing_file(server: Server, tmp_path: Path) -> None:
    target = tmp_path / "ml-1m.zip"
    with pytest.raises(InputDataError, match=r"could not download .*/nope\.zip \(HTTP 404 "):
        dl.download(f"{server.base}/nope.zip", target, md5="0" * 32)
    assert not target.exists() and not target.with_name("ml-1m.zip.part").exists()


def test_fetch_release_downloads_once_then_uses_the_cache(
    server: Server,
    tmp_path: Path,
    layouts: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    archive = layouts.write_zip(server.root / "ml-100k.zip", layouts.ML_100K)
    monkeypatch.setenv("MFBATCH_MOVIELENS_URL", server.base + "/")
    monkeypatch.setenv("MFBATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(dl.PUBLISHED_MD5, "ml-100k", dl.md5_file(archive))

    got = dl.fetch_release("ml-100k", None)
    assert got == tmp_path / "cache" / "ml-100k.zip"
    assert got.read_bytes() == archive.read_bytes()
    assert server.requests == ["/ml-100k.zip"]

    assert dl.fetch_release("ml-100k", None) == got  # verified cache hit: no request
    assert server.requests == ["/ml-100k.zip"]

    got.write_bytes(b"corrupted in the cache")  # a bad cached copy is fetched again
    assert dl.fetch_release("ml-100k", None) == got
    assert got.read_bytes() == archive.read_bytes()
    assert server.requests == ["/ml-100k.zip", "/ml-100k.zip"]

    elsewhere = tmp_path / "explicit"  # --cache-dir beats MFBATCH_CACHE
    assert dl.fetch_release("ml-100k", elsewhere) == elsewhere / "ml-100k.zip"
    assert (elsewhere / "ml-100k.zip").is_file()


def test_fetch_release_refuses_a_release_without_a_checksum(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MFBATCH_MOVIELENS_URL", server.base)
    with pytest.raises(InputDataError) as caught:
        dl.fetch_release("ml-latest-small", tmp_path)
    assert "no published checksum" in str(caught.value)
    assert "--source path/to/ml-latest-small.zip" in str(caught.value)
    assert server.requests == []


def test_cache_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MFBATCH_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dl.cache_dir(None) == tmp_path / "xdg" / "mfbatch"
    monkeypatch.setenv("MFBATCH_CACHE", str(tmp_path / "env"))
    assert dl.cache_dir(None) == tmp_path / "env"
    assert dl.cache_dir(tmp_path / "flag") == tmp_path / "flag"


def test_preprocess_downloads_a_release_without_source(
    server: Server,
    tmp_path: Path,
    layouts: Any,
    monkeypatch: pytest.MonkeyPatch,
    preprocess_cli: Preprocess,
    query: Callable[[Path, str], list[tuple[Any, ...]]],
) -> None:
    archive = layouts.write_zip(server.root / "ml-100k.zip", layouts.ML_100K)
    monkeypatch.setenv("MFBATCH_MOVIELENS_URL", server.base)
    monkeypatch.setitem(dl.PUBLISHED_MD5, "ml-100k", dl.md5_file(archive))
    cache, db = tmp_path / "cache", tmp_path / "mf.duckdb"
    run = preprocess_cli("--dataset", "ml-100k", "--cache-dir", cache, "--db", db)
    assert run.exit_code == 0, run.stderr
    assert run.stdout.startswith("preprocessed 7 rows from ml-100k")
    assert (cache / "ml-100k.zip").read_bytes() == archive.read_bytes()
    assert query(db, "SELECT source, layout FROM dataset_meta") == [
        (str(cache / "ml-100k.zip"), "ml-100k")
    ]
    assert query(db, "SELECT count(*) FROM ratings") == [(6,)]


def test_preprocess_with_an_unreachable_mirror(
    closed_port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    preprocess_cli: Preprocess,
    user_error: Callable[..., str],
) -> None:
    monkeypatch.setenv("MFBATCH_MOVIELENS_URL", f"http://127.0.0.1:{closed_port}")
    db = tmp_path / "mf.duckdb"
    run = preprocess_cli("--dataset", "ml-1m", "--cache-dir", tmp_path / "cache", "--db", db)
    user_error(
        run,
        3,
        f"could not download http://127.0.0.1:{closed_port}/ml-1m.zip",
        "pass --source path/to/ml-1m.zip",
    )
    assert not db.exists()
    assert list((tmp_path / "cache").iterdir()) == []


def test_download_cut_off_midway(tmp_path: Path) -> None:
    class Truncating(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"only the start")
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Truncating)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    target = tmp_path / "ml-1m.zip"
    url = f"http://127.0.0.1:{httpd.server_address[1]}/ml-1m.zip"
    try:
        with pytest.raises(InputDataError) as caught:
            dl.download(url, target, md5="0" * 32, timeout=10)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
    message = str(caught.value)
    assert "\n" not in message
    assert f"could not download {url} (connection closed after 14 of 100,000 bytes)" in message
    assert "--source" in message
    assert list(tmp_path.iterdir()) == []
