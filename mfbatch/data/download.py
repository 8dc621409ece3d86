"""Fetching a GroupLens archive into the cache, verified against its published MD5."""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from mfbatch.errors import InputDataError

# GroupLens' `.md5` sidecars. Only releases with a published checksum are downloaded:
# an archive we cannot verify is one the user should fetch and pass with --source.
PUBLISHED_MD5 = {
    "ml-100k": "0e33842e24a9c977be4e0107933c0723",
    "ml-1m": "c4d9eecfca2ab87c1945afe126590906",
    "ml-20m": "cd245b17a1ae2cc31bb14903e1204af3",
    "ml-25m": "6b51fb2759a8657d3bfcbfc42b592ada",
}
DEFAULT_BASE_URL = "https://files.grouplens.org/datasets/movielens"


def cache_dir(override: Path | None) -> Path:
    if override is not None:
        return override
    if env := os.environ.get("MFBATCH_CACHE"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "mfbatch"


def md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def fetch_release(dataset: str, cache: Path | None) -> Path:
    """The cached, verified archive for `dataset`, downloading it if needed."""
    if dataset not in PUBLISHED_MD5:
        raise InputDataError(
            f"--dataset {dataset}: no published checksum to verify a download against; "
            f"download {dataset}.zip yourself and pass --source path/to/{dataset}.zip"
        )
    target = cache_dir(cache) / f"{dataset}.zip"
    expected = PUBLISHED_MD5[dataset]
    if target.is_file() and md5_file(target) == expected:
        return target
    base = os.environ.get("MFBATCH_MOVIELENS_URL", DEFAULT_BASE_URL).rstrip("/")
    download(f"{base}/{dataset}.zip", target, md5=expected)
    return target


def download(url: str, target: Path, *, md5: str, timeout: float = 30.0) -> None:
    """Stream `url` to `target` with a progress bar; keep it only if the MD5 matches."""
    name = target.name
    hint = f"download {name} elsewhere and pass --source path/to/{name}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputDataError(f"cache folder {target.parent} can't be created ({exc})") from None
    partial = target.with_name(target.name + ".part")
    digest = hashlib.md5(usedforsecurity=False)
    received, total = 0, None
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, partial.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            # stderr, like every other message: stdout carries only the command's result.
            console = Console(stderr=True)
            with Progress(
                TextColumn(f"downloading {name}", markup=False),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=True,
                disable=not console.is_terminal,
            ) as progress:
                task = progress.add_task("download", total=total)
                while block := response.read(1 << 20):
                    out.write(block)
                    digest.update(block)
                    received += len(block)
                    progress.advance(task, len(block))
        if total is not None and received != total:
            raise ConnectionError(f"connection closed after {received:,} of {total:,} bytes")
    except (
        urllib.error.URLError,
        http.client.HTTPException,
        TimeoutError,
        ConnectionError,
    ) as exc:
        partial.unlink(missing_ok=True)
        reason = getattr(exc, "reason", exc)
        if isinstance(exc, urllib.error.HTTPError):
            reason = f"HTTP {exc.code} {exc.reason}"
        raise InputDataError(f"could not download {url} ({reason}); if offline, {hint}") from None
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise InputDataError(f"could not write {partial} ({exc}); free space or {hint}") from None
    if digest.hexdigest() != md5:
        partial.unlink(missing_ok=True)
        raise InputDataError(
            f"{url}: MD5 {digest.hexdigest()} does not match the published {md5}; "
            f"the download is corrupt or altered, so it was discarded; {hint}"
        )
    os.replace(partial, target)


def main(argv: list[str] | None = None) -> int:
    """The cached archive's path for `DATASET` on stdout, fetched if needed (`make all`).

    `make all` asks this before preprocessing so that, offline, it can say why and run on
    the built-in synthetic data instead of failing (exit 3 and the reason on stderr).
    """
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m mfbatch.data.download DATASET", file=sys.stderr)
        return 2
    try:
        print(fetch_release(args[0], None))
    except InputDataError as exc:
        print(exc, file=sys.stderr)
        return 3
    return 0
