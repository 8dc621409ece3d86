"""Every MovieLens layout (ML-100K, ML-1M, ML-10M, ML-latest), end to end through
`mfbatch preprocess`, checked table by table.

The expected tables are worked out by hand from the rows in conftest.py: numeric ids map
in numeric order (so 10 comes after 2, and 1193 after 914), duplicates keep the later
rating, ratings are scaled with the release's known scale, and the newest rating is held
out by the default `time` split with --val-fraction 0.1.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Preprocess, Query, assert_norm, items, meta, ok, ratings, sha256, users, utc

# --- ML-100K ---------------------------------------------------------------------------------

ML100K_USERS = [(0, "1", 2, 2), (1, "2", 2, 2), (2, "10", 2, 1)]
ML100K_ITEMS = [
    (0, "1", "Toy Story (1995)", "Animation|Children's|Comedy", 3, 3),
    (1, "2", "GoldenEye (1995)", "Action|Adventure|Thriller", 1, 1),
    (2, "3", "Misérables, Les (1995)", "Drama", 2, 1),
]
ML100K_RATINGS = [
    (0, 0, 5.0, 1.0, utc(874965758), "train", False, False),
    (0, 1, 4.0, 0.75, utc(876893200), "train", False, False),  # the later of two ratings
    (1, 0, 4.0, 0.75, utc(888550871), "train", False, False),
    (1, 2, 2.0, 0.25, utc(875072484), "train", False, False),
    (2, 0, 4.0, 0.75, utc(875071561), "train", False, False),
    (2, 2, 1.0, 0.0, utc(889751712), "val", False, False),
]


@pytest.mark.parametrize("form", ["zip", "folder", "parent-folder"])
def test_ml100k(
    layouts: Any, form: str, tmp_path: Path, preprocess_cli: Preprocess, query: Query
) -> None:
    if form == "zip":
        source = layouts.write_zip(tmp_path / "ml-100k.zip", layouts.ML_100K)
        ratings_file = source
    else:
        folder = layouts.write_tree(tmp_path / "x", layouts.ML_100K)
        source = folder if form == "folder" else folder.parent
        ratings_file = folder / "u.data"
    db = tmp_path / "out.duckdb"
    run = preprocess_cli("--dataset", "ml-100k", "--source", source, "--db", db, "--split", "time")
    ok(run)
    assert run.stdout.startswith("preprocessed 7 rows from ml-100k (1 duplicate")

    assert users(query, db) == ML100K_USERS
    assert items(query, db) == ML100K_ITEMS
    assert ratings(query, db) == ML100K_RATINGS
    m = meta(query, db)
    assert (m["loader"], m["layout"], m["rating_min"], m["rating_max"]) == (
        "movielens",
        "ml-100k",
        1.0,
        5.0,
    )
    assert (m["rows_in"], m["duplicates_dropped"], m["n_users"], m["n_items"]) == (7, 1, 3, 3)
    assert (m["n_ratings"], m["n_train"], m["n_val"]) == (6, 5, 1)
    assert (m["split_kind"], m["val_fraction"], m["time_cutoff"]) == (
        "time",
        0.1,
        utc(889751712),
    )
    assert m["source"] == str(source)
    assert m["source_sha256"] == sha256(ratings_file)


def test_ml100k_ratings_file_alone_has_no_titles(
    layouts: Any, tmp_path: Path, preprocess_cli: Preprocess, query: Query
) -> None:
    folder = layouts.write_tree(tmp_path / "x", layouts.ML_100K)
    db = tmp_path / "out.duckdb"
    ok(preprocess_cli("--source", folder / "u.data", "--db", db, "--split", "time"))
    assert [(i, n, t, g) for i, n, t, g, *_ in items(query, db)] == [
        (0, "1", None, None),
        (1, "2", None, None),
        (2, "3", None, None),
    ]
    assert ratings(query, db) == ML100K_RATINGS


# --- ML-1M -----------------------------------------------------------------------------------

ML1M_USERS = [(0, "1", 3, 2), (1, "2", 2, 2), (2, "6040", 2, 2)]
ML1M_ITEMS = [
    (
        0,
        "661",
        "Star Wars: Episode IV - A New Hope (1977)",
        "Action|Adventure|Fantasy|Sci-Fi",
        2,
        1,
    ),
    (1, "914", "Café au Lait (Métisse) (1993)", "Comedy", 2, 2),  # Latin-1 in the file
    (2, "1193", "One Flew Over the Cuckoo's Nest (1975)", "Drama", 3, 3),
]
ML1M_RATINGS = [
    (0, 0, 3.0, 0.5, utc(978302109), "val", False, False),
    (0, 1, 3.0, 0.5, utc(978301968), "train", False, False),
    (0, 2, 5.0, 1.0, utc(978300760), "train", False, False),
    (1, 1, 2.0, 0.25, utc(978299000), "train", False, False),
    (1, 2, 4.0, 0.75, utc(978298413), "train", False, False),
    (2, 0, 1.0, 0.0, utc(978300000), "train", False, False),
    (2, 2, 5.0, 1.0, utc(978299500), "train", False, False),
]


@pytest.mark.parametrize("form", ["zip", "folder", "ratings-file"])
def test_ml1m(
    layouts: Any, form: str, tmp_path: Path, preprocess_cli: Preprocess, query: Query
) -> None:
    if form == "zip":
        source = layouts.write_zip(tmp_path / "ml-1m.zip", layouts.ML_1M)
    else:
        folder = layouts.write_tree(tmp_path / "x", layouts.ML_1M)
        source = folder if form == "folder" else folder / "ratings.dat"
    db = tmp_path / "out.duckdb"
    # ml-1m is the default dataset; the expected counts are the global cutoff's.
    run = preprocess_cli("--source", source, "--db", db, "--split", "time")
    ok(run)
    assert run.stdout.startswith("preprocessed 7 rows from ml-1m (0 duplicate")
    assert users(query, db) == ML1M_USERS
    got_items = items(query, db)
    if form == "ratings-file":
        assert [row[:2] + row[4:] for row in got_items] == [r[:2] + r[4:] for r in ML1M_ITEMS]
        assert {row[2] for row in got_items} == {None}
    else:
        assert got_items == ML1M_ITEMS
    assert ratings(query, db) == ML1M_RATINGS
    m = meta(query, db)
    assert (m["layout"], m["rating_min"], m["rating_max"], m["n_val"]) == ("ml-1m", 1.0, 5.0, 1)
    assert m["source_sha256"] == sha256(source if form != "folder" else source / "ratings.dat")


def test_ml10m_layout_half_stars_utf8(
    layouts: Any, tmp_path: Path, preprocess_cli: Preprocess, query: Query
) -> None:
    members = {
        "ml-10M100K/ratings.dat": b"1::122::5::838985046\n1::185::4.5::838983525\n"
        b"2::122::0.5::868245777\n",
        "ml-10M100K/movies.dat": "122::Boomerang (1992)::Comedy|Romance\n"
        "185::Cité des enfants perdus, La (1995)::Adventure|Drama\n".encode(),  # UTF-8
    }
    db = tmp_path / "out.duckdb"
    ok(preprocess_cli("--source", layouts.write_zip(tmp_path / "ml-10m.zip", members), "--db", db))
    m = meta(query, db)
    assert (m["layout"], m["rating_min"], m["rating_max"]) == ("ml-10m", 0.5, 5.0)
    rows = ratings(query, db)
    assert [(u, i, r) for u, i, r, *_ in rows] == [(0, 0, 5.0), (0, 1, 4.5), (1, 0, 0.5)]
    assert_norm(rows, 0.5, 5.0)
    assert [row[3] for row in rows] == pytest.approx([1.0, 4.0 / 4.5, 0.0])
    assert [row[2] for row in items(query, db)] == [
        "Boomerang (1992)",
        "Cité des enfants perdus, La (1995)",
    ]


# --- ML-latest -------------------------------------------------------------------------------

ML_LATEST_ITEMS = [
    (0, "1", "Toy Story (1995)", "Adventure|Animation|Children|Comedy|Fantasy", 2, 2),
    (1, "3", "Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)", "Comedy|Romance", 2, 1),
    (2, "11", "American President, The (1995)", "Comedy|Drama|Romance", 2, 2),
]


@pytest.mark.parametrize("form", ["zip", "folder"])
def test_ml_latest_csv_crlf_half_stars(
    layouts: Any, form: str, tmp_path: Path, preprocess_cli: Preprocess, query: Query
) -> None:
    if form == "zip":
        source = layouts.write_zip(tmp_path / "ml-latest-small.zip", layouts.ML_LATEST)
    else:
        source = layouts.write_tree(tmp_path / "x", layouts.ML_LATEST)
    db = tmp_path / "out.duckdb"
    ok(preprocess_cli("--dataset", "ml-latest-small", "--source", source, "--db", db,
                      "--split", "time"))  # fmt: skip
    assert users(query, db) == [(0, "1", 3, 3), (1, "5", 2, 2), (2, "12", 1, 0)]
    assert items(query, db) == ML_LATEST_ITEMS
    rows = ratings(query, db)
    assert [(u, i, r, ts, s, cu, ci) for u, i, r, _, ts, s, cu, ci in rows] == [
        (0, 0, 4.0, utc(964982703), "train", False, False),
        (0, 1, 4.5, utc(964981247), "train", False, False),
        (0, 2, 0.5, utc(964982224), "train", False, False),
        (1, 0, 5.0, utc(847434962), "train", False, False),
        (1, 2, 3.5, utc(847435238), "train", False, False),
        # user 12's only rating is the newest: held out, and the user is unseen in train
        (2, 1, 2.0, utc(1100000000), "val", True, False),
    ]
    assert_norm(rows, 0.5, 5.0)
    assert rows[1][3] == pytest.approx(4.0 / 4.5)
    m = meta(query, db)
    assert (m["layout"], m["rating_min"], m["rating_max"]) == ("ml-latest", 0.5, 5.0)
    assert (m["n_val"], m["n_val_cold_user"], m["n_val_cold_item"]) == (1, 1, 0)


def test_same_ratings_same_tables_from_zip_and_folder(
    layouts: Any,
    tmp_path: Path,
    preprocess_cli: Preprocess,
    db_snapshot: Callable[[Path], dict[str, Any]],
) -> None:
    zipped, folder = tmp_path / "a.duckdb", tmp_path / "b.duckdb"
    ok(
        preprocess_cli(
            "--source", layouts.write_zip(tmp_path / "ml-1m.zip", layouts.ML_1M), "--db", zipped
        )
    )
    ok(
        preprocess_cli(
            "--source", layouts.write_tree(tmp_path / "x", layouts.ML_1M), "--db", folder
        )
    )
    a, b = db_snapshot(zipped), db_snapshot(folder)
    for table in ("users", "items", "ratings"):
        assert a[table] == b[table]
