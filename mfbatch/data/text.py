"""Delimited-text parsing with errors that point at a line.

Polars parses the whole file in one fast pass. Only when that fails, or leaves a required
field empty, do we look again (as strings, then line by line) to say which line and column
is wrong: the common case pays nothing for good messages.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import polars as pl

from mfbatch.errors import InputDataError, first_line

NUMERIC = (pl.Int64, pl.Float64)


def _excerpt(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def reline(data: bytes) -> bytes:
    """Lone-CR (old Mac) line ends as LF: Polars splits lines on LF only. One LF per CR
    keeps every line's number for the messages."""
    head = data[: 1 << 16]
    return data.replace(b"\r", b"\n") if b"\r" in head and b"\n" not in head else data


def read_delimited(
    data: bytes,
    *,
    origin: str,
    separator: str,
    names: Sequence[str],
    dtypes: Mapping[str, type[pl.DataType] | pl.DataType],
    skip_header: bool = False,
) -> pl.DataFrame:
    """Parse header-less text whose fields are `names`, in order, split on `separator`.

    `separator` may be two characters (MovieLens' `::`): Polars splits on single bytes, so
    the doubled byte yields empty spacer columns that are dropped. Blank lines are skipped.
    Raises InputDataError naming `origin`, the line and the column on any malformed line.
    """
    if not data.strip():
        raise InputDataError(f"{origin}: the file is empty; expected lines of {', '.join(names)}")
    data = reline(data)
    if skip_header and not data.partition(b"\n")[2].strip():
        raise InputDataError(
            f"{origin}: the file has a header but no rating lines; "
            f"expected lines of {', '.join(names)} after it"
        )
    doubled = len(separator) == 2 and separator[0] == separator[1]
    if len(separator) != 1 and not doubled:
        raise ValueError(f"unsupported separator {separator!r}")
    raw_names: list[str] = []
    for i, name in enumerate(names):
        if doubled and i:
            raw_names.append(f"__spacer{i}")
        raw_names.append(name)
    schema = {n: dtypes.get(n, pl.String) for n in raw_names}

    def explain() -> str | None:
        return _explain(
            data,
            origin=origin,
            separator=separator,
            names=names,
            dtypes=dtypes,
            skip_header=skip_header,
        )

    try:
        frame = pl.read_csv(
            io.BytesIO(data),
            separator=separator[0],
            has_header=False,
            skip_rows=int(skip_header),
            new_columns=raw_names,
            schema_overrides=schema,
            quote_char=None,
        )
    except (pl.exceptions.PolarsError, ValueError) as exc:
        raise InputDataError(
            explain() or f"{origin}: could not be parsed ({first_line(exc)})"
        ) from None
    frame = frame.select(names)
    blank = pl.all_horizontal(pl.col(n).is_null() for n in names)
    has_null = pl.any_horizontal(pl.col(n).is_null() for n in names)
    bad = frame.with_row_index("__row").filter(has_null & ~blank)
    if bad.height:
        row = int(bad["__row"][0])
        raise InputDataError(
            explain()
            or f"{origin} line {row + 1 + skip_header}: a field is empty; "
            f"expected {', '.join(names)}"
        )
    return frame.filter(~blank)


def _explain(
    data: bytes,
    *,
    origin: str,
    separator: str,
    names: Sequence[str],
    dtypes: Mapping[str, type[pl.DataType] | pl.DataType],
    skip_header: bool,
) -> str | None:
    """The first malformed line, described; None when no line looks wrong."""
    sep = separator.encode()
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        line = raw.rstrip(b"\r")
        if (skip_header and lineno == 1) or not line.strip():
            continue
        fields = line.split(sep)
        text = line.decode("latin-1")
        if len(fields) != len(names):
            return (
                f"{origin} line {lineno}: expected {len(names)} {separator!r}-separated fields "
                f"({', '.join(names)}), got {len(fields)}: {_excerpt(text)!r}"
            )
        for name, value in zip(names, fields, strict=True):
            dtype = dtypes.get(name, pl.String)
            if dtype in NUMERIC and not _parses(value, dtype):
                kind = "an integer" if dtype == pl.Int64 else "a number"
                return (
                    f"{origin} line {lineno}, column {name}: "
                    f"{_excerpt(value.decode('latin-1'))!r} is not {kind}"
                )
    return None


def _parses(value: bytes, dtype: object) -> bool:
    try:
        number = int(value) if dtype == pl.Int64 else float(value)
    except ValueError:
        return False
    return number == number  # NaN is not a rating


def check_numeric(frame: pl.DataFrame, *, origin: str, column: str, line_offset: int) -> None:
    """Fail on NaN/inf in a float column, naming the first line that holds one."""
    bad = frame.with_row_index("__row").filter(~pl.col(column).is_finite())
    if bad.height:
        row = int(bad["__row"][0])
        raise InputDataError(
            f"{origin} line {row + line_offset}, column {column}: {bad[column][0]} is not "
            "a finite number"
        )
