"""Reading a dataset from a zip archive, a folder, or a single file, the same way.

Archives are read in place, member by member, never extracted: no member path can land
outside the cache. Members whose names are absolute or climb with `..` are refused anyway,
since an archive that holds them was not made by GroupLens.
"""

from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath

from mfbatch.data.base import sha256_file
from mfbatch.errors import InputDataError


class Archive:
    """A read-only view of named files in a zip, a folder (searched one level down) or a file."""

    def __init__(self, path: Path) -> None:
        if not path.exists():
            raise InputDataError(
                f"--source: {path} does not exist; pass the dataset's zip, its folder or file"
            )
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        self._members: dict[str, str] = {}
        if path.is_file() and zipfile.is_zipfile(path):
            try:
                self._zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise InputDataError(f"--source: {path} is not a readable zip ({exc})") from None
            for info in self._zip.infolist():
                if info.is_dir():
                    continue
                # Backslashes too: a zip made on Windows may separate folders with them.
                name = info.filename.replace("\\", "/")
                parts = PurePosixPath(name).parts
                if not parts or name.startswith("/") or ".." in parts or ":" in parts[0]:
                    raise InputDataError(
                        f"--source: {path} holds an unsafe member path {info.filename!r}; "
                        "refusing to read it"
                    )
                # First occurrence wins; GroupLens archives hold one folder.
                self._members.setdefault(parts[-1], info.filename)
        elif path.is_dir():
            for candidate in sorted([*path.glob("*"), *path.glob("*/*")]):
                if candidate.is_file():
                    self._members.setdefault(candidate.name, str(candidate))
        elif path.suffix.lower() == ".zip":
            raise InputDataError(
                f"--source: {path} is not a readable zip (truncated or corrupt download?); "
                "download it again"
            )
        else:
            self._members[path.name] = str(path)

    def has(self, name: str) -> bool:
        return name in self._members

    def names(self) -> list[str]:
        return sorted(self._members)

    def origin(self, name: str) -> str:
        """How messages name a member: `archive.zip:ml-1m/ratings.dat` or the file path."""
        member = self._members[name]
        return f"{self.path.name}:{member}" if self._zip else member

    def read(self, name: str) -> bytes:
        member = self._members[name]
        try:
            if self._zip is not None:
                return self._zip.read(member)
            return Path(member).read_bytes()
        except (OSError, zipfile.BadZipFile) as exc:
            raise InputDataError(f"{self.origin(name)}: could not be read ({exc})") from None

    def sha256(self, name: str) -> str:
        """Checksum of the zip itself, or of the named file when reading a folder."""
        return sha256_file(self.path if self._zip else Path(self._members[name]))


def decode_text(data: bytes) -> str:
    # GroupLens' older releases are Latin-1, newer ones UTF-8. Bytes that are valid UTF-8
    # are almost never intended as Latin-1, so UTF-8 first is safe.
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")
