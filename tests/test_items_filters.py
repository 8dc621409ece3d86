"""Item metadata at serving time: `recommend` shows the metadata's titles, and `score
--where` / `--exclude-where` filter each publish by an --items-source attribute. One small
synthetic dataset with metadata is trained once; each test scores its own copy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    FAST,
    SMALL,
    Run,
    assert_error_last,
    assert_user_error,
    cli,
    cli_ok,
    ok,
    rows,
)

N_ITEMS = 40


def _metadata(path: Path) -> Path:
    """Items 1-36 described (37-40 not: NULL attributes); kids unknown for 1 and 2; one
    row (999) for an item nobody rated."""
    lines = ["item_id,title,year,kids"]
    for i in range(1, 37):
        kids = "" if i in (1, 2) else str(i % 3 == 0).lower()
        lines.append(f"{i},Item {i},{1980 + i},{kids}")
    lines.append("999,Nobody's,2030,false")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("described")
    db = root / "mf.duckdb"
    cli_ok("preprocess", "--dataset", "synthetic", "--users", "60", "--items", str(N_ITEMS),
           "--ratings-per-user", "12", "--db", db,
           "--items-source", _metadata(root / "items.csv"))  # fmt: skip
    cli_ok("train", "--db", db, "--export-dir", root / "export", *SMALL, "--epochs", "2",
           "--seed", "1", "--threads", "1")  # fmt: skip
    return root


@pytest.fixture
def db(trained: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained, tmp_path / "w")
    return tmp_path / "w" / "mf.duckdb"


def _score(db: Path, *args: str | Path) -> Run:
    return cli("score", "--db", db, *FAST, *args)


def _served(db: Path) -> list[tuple[Any, ...]]:
    """(user, item, year, kids) of every served row."""
    return rows(
        db,
        "SELECT r.user_id, r.item_id, i.year, i.kids FROM recommendations r "
        "JOIN items i USING (item_id) ORDER BY ALL",
    )


def _publishes(db: Path) -> int:
    if "publishes" not in {t for (t,) in rows(db, "SHOW TABLES")}:
        return 0
    return int(rows(db, "SELECT count(*) FROM publishes")[0][0])


def test_recommend_shows_the_metadata_titles(db: Path) -> None:
    ok(_score(db, "--top-k", "5"))
    user = rows(db, "SELECT min(user_id) FROM recommendations")[0][0]
    report = json.loads(cli_ok("recommend", "--db", db, "--user", user, "--json"))
    titles = dict(rows(db, "SELECT item_id, title FROM items"))
    assert len(report["recommendations"]) == 5
    for rec in report["recommendations"]:
        expected = f"Item {rec['item_id']}" if int(rec["item_id"]) <= 36 else None
        assert rec["title"] == expected == titles[rec["item_id"]]
    for rated in report["top_rated"]:
        assert rated["title"] == titles[rated["item_id"]]
    # And on the screen, the table beside the summary line.
    shown = cli_ok("recommend", "--db", db, "--user", user)
    first = report["recommendations"][0]
    assert (first["title"] or first["item_id"]) in shown


def test_where_on_a_custom_attribute(db: Path) -> None:
    ok(_score(db, "--top-k", str(N_ITEMS), "--where", "year >= 2000"))
    served = _served(db)
    assert served and all(year is not None and year >= 2000 for _, _, year, _ in served)
    # Every allowed unrated item is listed at K = the catalogue: the filter cut, not K.
    assert {item for _, item, _, _ in served} == {
        i for (i,) in rows(db, "SELECT item_id FROM items WHERE year >= 2000 AND n_train > 0")
    }


def test_exclude_where_never_lists_those_and_keeps_unknowns(db: Path) -> None:
    ok(_score(db, "--top-k", str(N_ITEMS), "--exclude-where", "kids"))
    served = _served(db)
    assert served and not any(kids for _, _, _, kids in served)
    # NULL is not true: items whose kids is unknown (1, 2, 37-40) are still offered.
    assert {"1", "2", "37"} & {item for _, item, _, _ in served}
    both = ("--where", "year >= 2000", "--exclude-where", "kids")
    ok(_score(db, "--top-k", str(N_ITEMS), *both))
    served = _served(db)
    assert served and all(year >= 2000 and not kids for _, _, year, kids in served)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--exclude-where", "item_idx >= 0"], ["--exclude-where", "leaves none"]),
        (["--where", "year > 3000"], ["--where", "no item matches"]),
        (
            ["--where", "year >= 2000", "--exclude-where", "year >= 2000"],
            ["--where and --exclude-where", "leaves none"],
        ),
        (["--exclude-where", "no_such > 1"], ["--exclude-where", "no_such", "year, kids"]),
        (["--exclude-where", "1 = 1; DROP TABLE items"], ["--exclude-where"]),
        (
            ["--where", "title = 'Item 3'", "--exclude-items", "ITEM3"],
            ["--where/--exclude-items", "nothing would be listed"],
        ),
    ],
)
def test_a_filter_that_leaves_nothing_is_refused_before_scoring(
    db: Path, tmp_path: Path, args: list[str], fragments: list[str]
) -> None:
    ok(_score(db, "--top-k", "5"))
    before, published = _served(db), _publishes(db)
    deny = tmp_path / "deny.txt"
    deny.write_text("3\n")
    args = [str(deny) if a == "ITEM3" else a for a in args]
    message = assert_user_error(_score(db, "--top-k", "5", *args), 2, *fragments)
    assert message.startswith(f"error: {args[0]}")
    assert _served(db) == before and _publishes(db) == published
    assert rows(db, "SELECT count(*) FROM items") == [(N_ITEMS,)]


def test_a_user_left_with_nothing_by_an_attribute_filter_refuses_the_publish(db: Path) -> None:
    """As with --include-items: a user who rated every item --where keeps is the filter's
    doing (not an appended heavy rater), so nothing is published and the line says which
    filter to widen."""
    ok(_score(db, "--top-k", "5"))
    before, published = _served(db), _publishes(db)
    ((_item, year),) = rows(
        db,
        "SELECT i.item_id, i.year FROM items i JOIN ratings r USING (item_idx) "
        "WHERE i.year IS NOT NULL GROUP BY ALL ORDER BY count(*) DESC, 1 LIMIT 1",
    )
    message = assert_error_last(
        _score(db, "--top-k", "5", "--where", f"year = {year}"), 2, "empty list", "--where"
    )
    assert "nothing was published" in message and "--include-items" not in message
    assert _served(db) == before and _publishes(db) == published


def test_an_exclude_where_that_matches_nothing_is_a_warning(db: Path) -> None:
    result = ok(_score(db, "--top-k", "5", "--exclude-where", "year > 3000"))
    assert "warning: --exclude-where 'year > 3000': no item matches; none excluded" in (
        result.stderr
    )
    assert _publishes(db) == 1


def test_an_attribute_added_by_an_append_filters_the_next_publish(db: Path) -> None:
    day = db.parent / "day.csv"
    day.write_text("user_id,item_id,rating,timestamp\n1,5,4,2000000000\n")
    band = db.parent / "bands.csv"
    band.write_text("item_id,band\n" + "".join(f"{i},{'R' * (i % 2 == 0) or 'PG'}\n"
                                               for i in range(1, 41)))  # fmt: skip
    append = ("preprocess", "--append", "--dataset", "csv", "--source", day)
    ok(cli(*append, "--items-source", band, "--db", db))
    ok(_score(db, "--top-k", "5", "--exclude-where", "band = 'R'"))
    served = {item for _, item, _, _ in _served(db)}
    assert served and all(int(item) % 2 for item in served)
    # The attributes from the preprocess's file are still there beside the new one.
    assert rows(db, "SELECT title, year, band FROM items WHERE item_id = '3'") == [
        ("Item 3", 1983, "PG")
    ]


def test_a_metadata_only_refresh_filters_the_next_publish_without_fold_in(db: Path) -> None:
    """No ratings read, no dataset version: the run is served as it was, no user folded in."""
    ok(_score(db, "--top-k", "5"))
    awards = db.parent / "awards.csv"
    awards.write_text("item_id,award\n" + "".join(f"{i},{str(i % 4 == 0).lower()}\n"
                                                  for i in range(1, 41)))  # fmt: skip
    line = cli_ok("preprocess", "--append", "--items-source", awards, "--db", db)
    assert "columns added: award; now 40 of 40 items described (was 36)" in line
    scored = ok(_score(db, "--top-k", "5", "--where", "award")).stdout
    assert "folded in" not in scored
    served = {item for _, item, _, _ in _served(db)}
    assert served and all(int(item) % 4 == 0 for item in served)
    assert rows(db, "SELECT count(*) FROM dataset_versions") == [(1,)]
