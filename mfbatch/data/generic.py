"""Any CSV or Parquet file of ratings, with the columns named on the command line."""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Literal

import polars as pl

from mfbatch.data.base import BaseDataLoader, RawData, sha256_file
from mfbatch.data.registry import register
from mfbatch.errors import InputDataError, first_line

_ROLE_FLAGS = {
    "user_id": "--user-col",
    "item_id": "--item-col",
    "rating": "--rating-col",
    "ts": "--time-col",
}


class _TableLoader(BaseDataLoader):
    """Shared by CSV and Parquet: pick the columns, type them, check them."""

    # Parquet also takes a folder of parts (hive-partitioned or not).
    folders = False

    def _source(self) -> Path:
        source = self.data.source
        if source is None:
            raise InputDataError(f"--source: --dataset {self.data.dataset} needs a file path")
        if self.folders and source.is_dir():
            if not any(source.rglob("*.parquet")):
                raise InputDataError(
                    f"--source: {source} is a folder with no .parquet files under it; pass a "
                    "Parquet file or a folder of parts"
                )
            return source
        if not source.is_file():
            raise InputDataError(f"--source: {source} does not exist or is not a file")
        return source

    def _columns(self) -> dict[str, str]:
        """Role -> column name in the file."""
        roles = {
            "user_id": self.data.user_col,
            "item_id": self.data.item_col,
            "rating": self.data.rating_col,
        }
        if self.data.time_col:
            roles["ts"] = self.data.time_col
        return roles

    def _check_present(self, source: Path, found: list[str]) -> dict[str, str]:
        roles = self._columns()
        for role, column in roles.items():
            if column not in found:
                shown = ", ".join(found[:12]) + (", ..." if len(found) > 12 else "")
                if len(found) == 1 and self.name == "csv":
                    hint = f"only one column: check --separator ({self.data.separator!r} now)"
                elif role == "ts":
                    hint = "pass --time-col with one of them, or --time-col '' --split random"
                else:
                    hint = f"pass {_ROLE_FLAGS[role]} with one of them"
                raise InputDataError(
                    f"{source}: no column {column!r} for {role} (columns: {shown}); {hint}"
                )
        return roles

    def _read(self, source: Path) -> pl.DataFrame:
        raise NotImplementedError

    def _where(self, row: int) -> str:
        """How messages point at the frame's `row` (0-based); CSV names the file line."""
        return f"row {row}"

    def _explain_missing(self, source: Path, row: int) -> str | None:
        """Why a value is missing at `row` (a short line), when the format can tell."""
        return None

    def load_data(self) -> RawData:
        source = self._source()
        frame = self._read(source).with_row_index("__row")
        roles = self._columns()
        # A row with no user, item, rating (or time) is a blank line: it holds no rating.
        frame = frame.filter(~pl.all_horizontal(pl.col(role).is_null() for role in roles))
        if frame.height == 0:
            raise InputDataError(f"{source}: the file holds no rating rows")
        checked = [r for r in ("user_id", "item_id", "rating", "ts") if r in roles]
        if self.split.kind == "random":
            checked = [r for r in checked if r != "ts"]  # a random split needs no time
        for role in checked:
            nulls = frame.filter(pl.col(role).is_null())
            if nulls.height:
                need = f"; --split {self.split.kind} needs a time on every rating"
                need = need if role == "ts" else ""
                row = int(nulls["__row"][0])
                raise InputDataError(
                    self._explain_missing(source, row)
                    or f"{source} {self._where(row)}, column {roles[role]}: value is missing{need}"
                )
        frame = frame.with_columns(_as_id(frame["user_id"]), _as_id(frame["item_id"]))
        bad = frame.filter(~pl.col("rating").is_finite())
        if bad.height:
            raise InputDataError(
                f"{source} {self._where(int(bad['__row'][0]))}, column {roles['rating']}: "
                f"{bad['rating'][0]} is not a finite number"
            )
        ts = (
            _as_timestamp(frame, source, roles["ts"], self._where)
            if "ts" in frame.columns
            else None
        )
        frame = frame.with_columns(
            ts if ts is not None else pl.lit(None, dtype=pl.Datetime("us")).alias("ts")
        )
        return RawData(
            ratings=frame.select("user_id", "item_id", "rating", "ts"),
            items=None,
            source=str(source),
            source_sha256=sha256_source(source),
            loader=self.name,
            layout=self.name,
            rating_scale=None,
        )


def sha256_source(source: Path) -> str:
    """A file's checksum; for a folder of parts, one over each part's path and checksum."""
    if not source.is_dir():
        return sha256_file(source)
    digest = hashlib.sha256()
    for part in sorted(source.rglob("*.parquet")):
        digest.update(f"{part.relative_to(source).as_posix()}\0{sha256_file(part)}\n".encode())
    return digest.hexdigest()


def _as_id(column: pl.Series) -> pl.Series:
    # Integer ids stay integers (numeric order); anything else is compared as text.
    if column.dtype.is_integer():
        return column.cast(pl.Int64)
    if column.dtype.is_float() and (column == column.round()).all():
        return column.cast(pl.Int64)
    if column.dtype == pl.String:
        # Text that is exactly an integer's spelling ("7", not "007" or "+7") is one.
        as_int = column.cast(pl.Int64, strict=False)
        if as_int.null_count() == column.null_count() and (as_int.cast(pl.String) == column).all():
            return as_int
    return column.cast(pl.String)


# Unix epochs are told apart by magnitude: seconds past 1e11 would be the year 5138, so a
# larger value is in ms, then us, then ns (1.7e18 ns is 2023). Anything that still lands
# outside these years is not a time a rating was made.
EPOCH_UNITS: tuple[tuple[float, Literal["s", "ms", "us", "ns"]], ...] = (
    (1e11, "s"),
    (1e14, "ms"),
    (1e17, "us"),
    (float("inf"), "ns"),
)
EARLIEST = datetime(1900, 1, 1)
LATEST = datetime(2100, 1, 1)
OUTSIDE_YEARS = (
    f"is outside {EARLIEST.year}-{LATEST.year} as a time; give Unix seconds, ms, us or ns, "
    "or an ISO date-time"
)


def _as_timestamp(
    frame: pl.DataFrame, source: Path, column: str, where: Callable[[int], str]
) -> pl.Series:
    ts = frame["ts"]

    def refuse(row: int, value: object, why: str) -> InputDataError:
        return InputDataError(f"{source} {where(row)}, column {column}: {value!r} {why}")

    if ts.dtype.is_numeric():
        if ts.dtype.is_float():
            odd = frame.filter(~ts.is_finite() & ts.is_not_null())
            if odd.height:
                raise refuse(int(odd["__row"][0]), odd["ts"][0], "is not a Unix time")
        largest = float(ts.abs().max() or 0)  # type: ignore[arg-type]
        unit = next(u for bound, u in EPOCH_UNITS if largest <= bound)
        parsed = pl.from_epoch(ts.cast(pl.Int64), time_unit=unit).cast(pl.Datetime("us"))
    elif isinstance(ts.dtype, pl.Datetime):
        if ts.dtype.time_zone is not None:
            ts = ts.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
        parsed = ts.cast(pl.Datetime("us"))
    elif isinstance(ts.dtype, pl.Date):
        parsed = ts.cast(pl.Datetime("us"))
    else:
        text = ts.cast(pl.String)
        try:
            parsed = text.str.to_datetime(strict=False, time_unit="us")
        except pl.exceptions.PolarsError:
            # No date-time format fits the first value, so Polars can't even try the rest.
            first = frame.filter(ts.is_not_null())
            raise refuse(
                int(first["__row"][0]),
                first["ts"][0],
                "is not a timestamp (expected Unix seconds/ms/us/ns or an ISO date-time)",
            ) from None
        bad = frame.filter(parsed.is_null() & ts.is_not_null())
        if bad.height:
            raise refuse(
                int(bad["__row"][0]),
                bad["ts"][0],
                "is not a timestamp (expected Unix seconds/ms/us/ns or an ISO date-time)",
            )
        if isinstance(parsed.dtype, pl.Datetime) and parsed.dtype.time_zone is not None:
            parsed = parsed.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    outside = frame.filter((parsed < EARLIEST) | (parsed >= LATEST))
    if outside.height:
        raise refuse(
            int(outside["__row"][0]),
            outside["ts"][0],
            OUTSIDE_YEARS,
        )
    return parsed.alias("ts")


@register("csv")
class CsvLoader(_TableLoader):
    def _read(self, source: Path) -> pl.DataFrame:
        sep = self.data.separator
        try:
            header = pl.read_csv(source, separator=sep, n_rows=0).columns
        except (pl.exceptions.NoDataError, pl.exceptions.PolarsError) as exc:
            if source.stat().st_size == 0 or isinstance(exc, pl.exceptions.NoDataError):
                raise InputDataError(f"{source}: the file is empty") from None
            raise InputDataError(f"{source}: unreadable header ({first_line(exc)})") from None
        roles = self._check_present(source, header)
        rename = {column: role for role, column in roles.items()}
        try:
            frame = pl.read_csv(
                source,
                separator=sep,
                columns=list(roles.values()),
                # Ids as text: inferring integers would merge "007" and "7" into one id.
                schema_overrides={
                    roles["rating"]: pl.Float64,
                    roles["user_id"]: pl.String,
                    roles["item_id"]: pl.String,
                },
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

    def _explain(self, source: Path, roles: dict[str, str]) -> str | None:
        """Read again as text to name the first line whose rating is not a number."""
        if ragged := self._ragged(source):
            return ragged
        try:
            text = pl.read_csv(
                source,
                separator=self.data.separator,
                columns=list(roles.values()),
                infer_schema=False,
            ).with_row_index("__row")
        except (pl.exceptions.PolarsError, ValueError) as exc:
            return f"{source}: malformed CSV ({first_line(exc)}); check --separator and quoting"
        rating = roles["rating"]
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


@register("parquet")
class ParquetLoader(_TableLoader):
    folders = True

    def _read(self, source: Path) -> pl.DataFrame:
        if source.is_dir():
            return self._read_folder(source)
        roles = self._checked_schema(source, self._file_schema(source))
        frame = pl.read_parquet(source, columns=list(roles.values()))
        return frame.rename({column: role for role, column in roles.items()}).with_columns(
            pl.col("rating").cast(pl.Float64)
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
            scan = pl.scan_parquet(source, row_index_name=row_index)
        roles = self._checked_schema(source, schema)
        return source, self._select(scan, roles, row_index)

    @staticmethod
    def _file_schema(source: Path) -> pl.Schema:
        try:
            return pl.Schema(pl.read_parquet_schema(source))
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise InputDataError(
                f"{source}: not a readable Parquet file ({first_line(exc)})"
            ) from None

    def _checked_schema(self, source: Path, schema: pl.Schema) -> dict[str, str]:
        roles = self._check_present(source, list(schema.names()))
        rating_type = schema[roles["rating"]]
        if not rating_type.is_numeric():
            raise InputDataError(
                f"{source}: column {roles['rating']} holds {rating_type}, not numbers; "
                "pass --rating-col naming the numeric rating column"
            )
        return roles

    @staticmethod
    def _select(
        scan: pl.LazyFrame, roles: dict[str, str], row_index: str | None = None
    ) -> pl.LazyFrame:
        kept = [pl.col(column).alias(role) for role, column in roles.items()]
        if row_index is not None:
            kept.append(pl.col(row_index))
        return scan.select(kept).with_columns(pl.col("rating").cast(pl.Float64))

    @staticmethod
    def _scan_folder(source: Path, row_index: str | None = None) -> pl.LazyFrame:
        try:
            scan = pl.scan_parquet(
                source / "**" / "*.parquet", hive_partitioning=True, row_index_name=row_index
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
