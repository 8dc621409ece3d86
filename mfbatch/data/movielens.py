"""GroupLens MovieLens, every release layout, from the zip, its folder or the ratings file.

| layout            | ratings                                 | items                       |
|-------------------|-----------------------------------------|-----------------------------|
| ml-100k           | u.data: tab, user item rating ts        | u.item: Latin-1, `|`, flags |
| ml-1m, ml-10m     | ratings.dat: `::`, half stars in 10M    | movies.dat: `::`            |
| ml-20m .. latest  | ratings.csv: header, half stars, CRLF ok | movies.csv: quoted CSV     |
"""

from __future__ import annotations

import io

import polars as pl

from mfbatch.data.archive import Archive, decode_text
from mfbatch.data.base import BaseDataLoader, RawData
from mfbatch.data.download import fetch_release
from mfbatch.data.registry import register
from mfbatch.data.text import check_numeric, read_delimited, reline
from mfbatch.errors import InputDataError, first_line

_RATING_NAMES = ["user_id", "item_id", "rating", "ts"]
_RATING_DTYPES = {"user_id": pl.Int64, "item_id": pl.Int64, "rating": pl.Float64, "ts": pl.Int64}


def _finish(frame: pl.DataFrame, origin: str, line_offset: int) -> pl.DataFrame:
    check_numeric(frame, origin=origin, column="rating", line_offset=line_offset)
    return frame.with_columns(ts=pl.from_epoch("ts", time_unit="s"))


def _ratings_100k(archive: Archive) -> pl.DataFrame:
    origin = archive.origin("u.data")
    frame = read_delimited(
        archive.read("u.data"),
        origin=origin,
        separator="\t",
        names=_RATING_NAMES,
        dtypes=_RATING_DTYPES,
    )
    return _finish(frame, origin, 1)


def _items_100k(archive: Archive) -> pl.DataFrame | None:
    if not archive.has("u.item"):
        return None
    genre_names: dict[int, str] = {}
    if archive.has("u.genre"):
        for line in decode_text(archive.read("u.genre")).splitlines():
            name, _, index = line.strip().rpartition("|")
            if name and index.isdigit():
                genre_names[int(index)] = name
    rows = []
    for line in decode_text(archive.read("u.item")).splitlines():
        fields = line.rstrip("\r").split("|")
        if len(fields) < 2:
            continue
        flags = fields[5:]
        genres = [genre_names.get(i, str(i)) for i, flag in enumerate(flags) if flag == "1"]
        rows.append((fields[0], fields[1], "|".join(genres) or None))
    return pl.DataFrame(rows, schema=["item_id", "title", "genres"], orient="row")


def _ratings_dat(archive: Archive) -> pl.DataFrame:
    origin = archive.origin("ratings.dat")
    frame = read_delimited(
        archive.read("ratings.dat"),
        origin=origin,
        separator="::",
        names=_RATING_NAMES,
        dtypes=_RATING_DTYPES,
    )
    return _finish(frame, origin, 1)


def _items_dat(archive: Archive) -> pl.DataFrame | None:
    if not archive.has("movies.dat"):
        return None
    rows = []
    for line in decode_text(archive.read("movies.dat")).splitlines():
        # Titles may hold ':' but never '::'; genres are the last field.
        fields = line.rstrip("\r").split("::")
        if len(fields) >= 3:
            rows.append((fields[0], "::".join(fields[1:-1]), fields[-1] or None))
    return pl.DataFrame(rows, schema=["item_id", "title", "genres"], orient="row")


def _ratings_csv(archive: Archive) -> pl.DataFrame:
    origin = archive.origin("ratings.csv")
    data = reline(archive.read("ratings.csv"))
    # utf-8-sig: a file re-saved by a spreadsheet starts with a byte-order mark.
    header = data.split(b"\n", 1)[0].strip().decode("utf-8-sig", "replace")
    expected = "userId,movieId,rating,timestamp"
    if header != expected:
        raise InputDataError(
            f"{origin} line 1: header is {header!r}, expected {expected!r}; for other "
            "CSV files use --dataset csv with --user-col/--item-col/--rating-col/--time-col"
        )
    frame = read_delimited(
        data,
        origin=origin,
        separator=",",
        names=_RATING_NAMES,
        dtypes=_RATING_DTYPES,
        skip_header=True,
    )
    return _finish(frame, origin, 2)


def _items_csv(archive: Archive) -> pl.DataFrame | None:
    if not archive.has("movies.csv"):
        return None
    try:
        frame = pl.read_csv(io.BytesIO(archive.read("movies.csv")), infer_schema=False)
        return frame.select(
            item_id=pl.col("movieId"), title=pl.col("title"), genres=pl.col("genres")
        )
    except (pl.exceptions.PolarsError, ValueError) as exc:
        first = first_line(exc)
        raise InputDataError(f"{archive.origin('movies.csv')}: unreadable ({first})") from None


@register("movielens")
class MovieLensLoader(BaseDataLoader):
    """Any GroupLens release; the layout is told by which ratings file the source holds."""

    def load_data(self) -> RawData:
        source = self.data.source or fetch_release(self.data.dataset, self.data.cache_dir)
        archive = Archive(source)
        if archive.has("u.data"):
            ratings, items, layout = _ratings_100k(archive), _items_100k(archive), "ml-100k"
            name = "u.data"
        elif archive.has("ratings.dat"):
            ratings, items, name = _ratings_dat(archive), _items_dat(archive), "ratings.dat"
            whole = ratings.select((pl.col("rating") == pl.col("rating").round()).all()).item()
            layout = "ml-1m" if whole else "ml-10m"
        elif archive.has("ratings.csv"):
            ratings, items, name = _ratings_csv(archive), _items_csv(archive), "ratings.csv"
            layout = "ml-latest"
        else:
            raise InputDataError(
                f"--source: {source} holds no MovieLens ratings file (u.data, ratings.dat or "
                f"ratings.csv; found {', '.join(archive.names()[:8]) or 'nothing'}); for other "
                "files use --dataset csv or --dataset parquet"
            )
        # The 100K and 1M releases rate in whole stars 1..5; later ones in half stars.
        scale = (1.0, 5.0) if layout in ("ml-100k", "ml-1m") else (0.5, 5.0)
        return RawData(
            ratings=ratings,
            items=items,
            source=str(source),
            source_sha256=archive.sha256(name),
            loader=self.name,
            layout=layout,
            rating_scale=scale,
        )
