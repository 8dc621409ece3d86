"""Any CSV or Parquet file of ratings, with the columns named on the command line."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import polars as pl

from mfbatch.data.registry import register
from mfbatch.data.tables import ROLE_FLAGS, TableLoader, csv_types, first_word, numeric_casts
from mfbatch.errors import InputDataError, first_line


@register("csv")
class CsvLoader(TableLoader):
    # Set by _read: the file's text with lone-CR line ends made LF, or None to read the file.
    _relined: bytes | None = None

    def _input(self, source: Path) -> Path | io.BytesIO:
        """What Polars reads: the file itself, or its text relined (Polars splits lines on LF
        only, so an old-Mac file of lone CRs would be one long header line)."""
        return source if self._relined is None else io.BytesIO(self._relined)

    def _reline(self, source: Path) -> None:
        with source.open("rb") as handle:
            head = handle.read(1 << 16)
        lone_cr = b"\r" in head and b"\n" not in head
        # One CR for one LF: every line keeps its number.
        self._relined = source.read_bytes().replace(b"\r", b"\n") if lone_cr else None

    def _read(self, source: Path) -> pl.DataFrame:
        sep = self.data.separator
        self._reline(source)
        try:
            header = pl.read_csv(self._input(source), separator=sep, n_rows=0, glob=False).columns
        except (pl.exceptions.NoDataError, pl.exceptions.PolarsError) as exc:
            if source.stat().st_size == 0 or isinstance(exc, pl.exceptions.NoDataError):
                raise InputDataError(f"{source}: the file is empty") from None
            raise InputDataError(
                self._not_utf8(source) or f"{source}: unreadable header ({first_line(exc)})"
            ) from None
        roles = self._check_present(source, header)
        rename = {column: role for role, column in roles.items()}
        try:
            frame = pl.read_csv(
                self._input(source),
                glob=False,
                separator=sep,
                columns=list(roles.values()),
                schema_overrides=csv_types(roles),
                infer_schema_length=10_000,
            )
        except (pl.exceptions.PolarsError, ValueError) as exc:
            raise InputDataError(
                self._explain(source, roles) or f"{source}: {first_line(exc)}"
            ) from None
        return frame.rename(rename)

    def _where(self, row: int) -> str:
        return f"line {row + 2}"  # 1-based, after the header line

    def _explain_missing(self, source: Path, row: int) -> str | None:
        return self._ragged(source, until=row + 2)

    def _ragged(self, source: Path, until: int | None = None) -> str | None:
        """The first line (up to `until`) whose field count differs from the header's."""
        with source.open(encoding="utf-8", errors="replace", newline="") as handle:
            reader = csv.reader(handle, delimiter=self.data.separator)
            header = next(reader, [])
            for fields in reader:
                if until is not None and reader.line_num > until:
                    break
                if fields and len(fields) != len(header):
                    shown = self.data.separator.join(fields)
                    shown = shown if len(shown) <= 60 else shown[:57] + "..."
                    return (
                        f"{source} line {reader.line_num}: expected {len(header)} "
                        f"{self.data.separator!r}-separated fields like the header, "
                        f"got {len(fields)}: {shown!r}"
                    )
        return None

    def _not_utf8(self, source: Path) -> str | None:
        """The first line holding a byte that is not UTF-8, its column and the byte."""
        sep = self.data.separator.encode()
        with source.open("rb") as handle:
            text = io.BytesIO(self._relined) if self._relined is not None else handle
            header: list[bytes] = []
            for lineno, line in enumerate(text, start=1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    at = line[: exc.start].count(sep)
                    field = line[: exc.start].rpartition(sep)[2] + line[exc.start :]
                    field = field.split(sep, 1)[0].rstrip(b"\r\n")
                    where = f"line {lineno}"
                    if lineno > 1 and at < len(header):
                        where += f", column {header[at].decode('utf-8', 'replace')}"
                    return (
                        f"{source} {where}: byte 0x{line[exc.start]:02X} in "
                        f"'{field.decode('utf-8', 'backslashreplace')}' is not UTF-8; save "
                        "the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                    )
                if lineno == 1:
                    header = line.rstrip(b"\r\n").split(sep)
        return None

    def _explain(self, source: Path, roles: dict[str, str]) -> str | None:
        """Read again as text to name the first line whose rating is not a number."""
        if found := self._not_utf8(source) or self._ragged(source):
            return found
        try:
            text = pl.read_csv(
                self._input(source),
                glob=False,
                separator=self.data.separator,
                columns=list(roles.values()),
                infer_schema=False,
            ).with_row_index("__row")
        except (pl.exceptions.PolarsError, ValueError) as exc:
            return f"{source}: malformed CSV ({first_line(exc)}); check --separator and quoting"
        for role in ("rating", "weight"):
            if role in roles and (found := self._not_a_number(source, text, roles[role])):
                return found
        # Unix times with a word past the rows Polars samples for the column's type.
        if "ts" in roles and (word := first_word(text, text[roles["ts"]])) is not None:
            return (
                f"{source} line {word[0] + 2}, column {roles['ts']}: {word[1]!r} is not a "
                "timestamp (expected Unix seconds/ms/us/ns or an ISO date-time)"
            )
        return None

    @staticmethod
    def _not_a_number(source: Path, text: pl.DataFrame, rating: str) -> str | None:
        bad = text.filter(
            pl.col(rating).is_not_null()
            & pl.col(rating).str.strip_chars().cast(pl.Float64, strict=False).is_null()
        )
        if bad.height:
            return (
                f"{source} line {int(bad['__row'][0]) + 2}, column {rating}: "
                f"{bad[rating][0]!r} is not a number"
            )
        return None


# What Polars reads as a glob pattern in a path.
GLOB_CHARS = ("*", "?", "[")


@register("parquet")
class ParquetLoader(TableLoader):
    folders = True

    def _read(self, source: Path) -> pl.DataFrame:
        if source.is_dir():
            return self._read_folder(source)
        roles = self._checked_schema(source, self._file_schema(source))
        frame = pl.read_parquet(source, columns=list(roles.values()), glob=False)
        return frame.rename({column: role for role, column in roles.items()}).with_columns(
            numeric_casts(roles)
        )

    def scan(self, *, row_index: str) -> tuple[Path, pl.LazyFrame]:
        """The source as a lazy frame of the role columns (rating as Float64) and each row's
        position (`row_index`), checked against its schema and nothing else: what the
        out-of-core preprocess streams (mfbatch.data.outofcore checks the values as
        `load_data` does). The position is numbered by the scan itself, so a slice of rows
        reads only those rows."""
        source = self._source()
        if source.is_dir():
            scan = self._scan_folder(source, row_index)
            schema = scan.collect_schema()
        else:
            schema = self._file_schema(source)
            scan = pl.scan_parquet(source, row_index_name=row_index, glob=False)
        roles = self._checked_schema(source, schema)
        return source, self._select(scan, roles, row_index)

    @staticmethod
    def _file_schema(source: Path) -> pl.Schema:
        try:
            # Not read_parquet_schema: it takes no glob=False, so `p[1].parquet` is `p1`'s.
            return pl.scan_parquet(source, glob=False).collect_schema()
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise InputDataError(
                f"{source}: not a readable Parquet file ({first_line(exc)})"
            ) from None

    def _checked_schema(self, source: Path, schema: pl.Schema) -> dict[str, str]:
        roles = self._check_present(source, list(schema.names()))
        for role in ("rating", "weight"):
            if role not in roles:
                continue
            kind = schema[roles[role]]
            if not kind.is_numeric():
                raise InputDataError(
                    f"{source}: column {roles[role]} holds {kind}, not numbers; "
                    f"pass {ROLE_FLAGS[role]} naming the numeric {role} column"
                )
        return roles

    @staticmethod
    def _select(
        scan: pl.LazyFrame, roles: dict[str, str], row_index: str | None = None
    ) -> pl.LazyFrame:
        kept = [pl.col(column).alias(role) for role, column in roles.items()]
        if row_index is not None:
            kept.append(pl.col(row_index))
        return scan.select(kept).with_columns(numeric_casts(roles))

    def _hive_text(self, source: Path) -> dict[str, pl.DataType] | None:
        """The partition keys that are ids (or the given split) read as the text the folder
        names spell: inferred, `user=007` and `user=7` would be one user."""
        keys = {
            name.split("=", 1)[0]
            for part in source.rglob("*.parquet")
            for name in part.relative_to(source).parts[:-1]
            if "=" in name
        }
        text = {self.data.user_col, self.data.item_col, self.split.split_col}
        return {key: pl.String() for key in keys if key in text} or None

    @staticmethod
    def _parts(source: Path) -> tuple[Path, bool]:
        """What Polars scans for the folder, and whether as a glob pattern. A path is read as
        a pattern by default, so a folder named `my[1]` would read `my1`'s parts: such a
        folder is given as itself (hive keys then start below it, as with the pattern), and
        Polars reads every visible file in it, so all must be Parquet."""
        if not any(char in str(source) for char in GLOB_CHARS):
            return source / "**" / "*.parquet", True
        for path in sorted(source.rglob("*")):
            shown = path.relative_to(source).parts
            if path.is_file() and path.suffix != ".parquet" and shown[-1][:1] not in "._":
                raise InputDataError(
                    f"{source}: {path.relative_to(source)} is not a .parquet part; a folder "
                    f"whose name holds {''.join(GLOB_CHARS)} is read whole: move other files "
                    "out of it or rename it"
                )
        return source, False

    def _scan_folder(self, source: Path, row_index: str | None = None) -> pl.LazyFrame:
        parts, glob = self._parts(source)
        try:
            scan = pl.scan_parquet(
                parts,
                glob=glob,
                hive_partitioning=True,
                hive_schema=self._hive_text(source),
                try_parse_hive_dates=False,
                row_index_name=row_index,
            )
            scan.collect_schema()
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise InputDataError(
                f"{source}: not a readable folder of Parquet parts ({first_line(exc)})"
            ) from None
        return scan

    def _read_folder(self, source: Path) -> pl.DataFrame:
        """Every part under `source`; `key=value` folder names become columns (hive), so a
        partition key can be the user, item or time column. Read with Polars' streaming
        engine: only the four columns are materialised, part by part."""
        scan = self._scan_folder(source)
        roles = self._checked_schema(source, scan.collect_schema())
        try:
            return self._select(scan, roles).collect(engine="streaming")
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise InputDataError(
                f"{source}: the parts could not be read together ({first_line(exc)}); "
                "check that they share one schema"
            ) from None
