"""The Python API beyond the stages: `mfbatch.load(...)` as a model object checked against
the lists `score` published, DataFrame sources, `verbose=`, one-line errors. Real files,
real ONNX graphs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from conftest import rows, unstamped

import mfbatch
from mfbatch.errors import ConfigError, InputDataError

SMALL = {"embedding_dim": 8, "epochs": 3}


@pytest.fixture(scope="module")
def _served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("model")
    path = root / "m.duckdb"
    mfbatch.preprocess(db=path, dataset="synthetic", users=60, items=40, ratings_per_user=10)
    mfbatch.train(db=path, export_dir=root / "export", threads=1, **SMALL)
    mfbatch.train(db=path, on="all", export_dir=root / "export", threads=1)
    # A newcomer the served run never saw: `score` folds them in.
    items = [i for (i,) in rows(path, "SELECT item_id FROM items ORDER BY n_ratings DESC")][:4]
    new = root / "new.csv"
    new.write_text(
        "user_id,item_id,rating,timestamp\n"
        + "".join(f"newcomer,{item},{5 - n},{2_000_000_000 + n}\n" for n, item in enumerate(items))
    )
    mfbatch.append(db=path, dataset="csv", source=new)
    mfbatch.score(db=path, top_k=5, threads=1)
    return path


@pytest.fixture
def served(_served: Path, tmp_path: Path) -> Path:
    shutil.copytree(_served.parent, tmp_path / "w")
    return tmp_path / "w" / "m.duckdb"


def _published(path: Path) -> pl.DataFrame:
    return pl.DataFrame(
        rows(path, "SELECT user_id, rank, item_id, score, source FROM recommendations"),
        schema=["user_id", "rank", "item_id", "score", "source"],
        orient="row",
    ).sort("user_id", "rank")


def test_known_users_get_the_published_lists(served: Path) -> None:
    model = mfbatch.load(db=served)
    published = _published(served)
    users = published["user_id"].unique().sort().to_list()
    assert "newcomer" in users and len(users) > 50
    mine = model.recommend(users, k=5).sort("user_id", "rank")
    assert mine.columns == ["user_id", "rank", "item_id", "score", "source"]
    assert mine.select("user_id", "rank", "item_id", "source").equals(
        published.select("user_id", pl.col("rank").cast(pl.Int32), "item_id", "source")
    )
    assert np.allclose(mine["score"].to_numpy(), published["score"].to_numpy(), rtol=1e-5)
    assert set(mine["source"]) >= {"model", "fold-in"}
    (run,) = rows(served, "SELECT DISTINCT run_id FROM recommendations")[0]
    assert model.run_id == run


def test_a_history_it_has_not_seen_is_folded_in_like_score_does(served: Path) -> None:
    model = mfbatch.load(db=served)
    query = (
        "SELECT i.item_id, x.rating FROM ratings x JOIN users u USING (user_idx) "
        "JOIN items i USING (item_idx) WHERE u.user_id = 'newcomer' ORDER BY x.ts"
    )
    rated = rows(served, query)
    history = {item: stars for item, stars in rated}  # oldest first, as the API reads it
    mine = model.recommend(histories={"visitor": history}, k=5)
    published = _published(served).filter(pl.col("user_id") == "newcomer")
    assert mine["item_id"].to_list() == published["item_id"].to_list()
    assert set(mine["source"]) == {"fold-in"} and set(mine["user_id"]) == {"visitor"}
    # Items only (each a top rating): nothing it was given comes back; the filters apply.
    given = list(history)[:2]
    blocked = model.recommend(k=5, histories={"v": given})["item_id"].to_list()
    excluded = model.recommend(k=5, histories={"v": given}, exclude=blocked[:1])
    assert not set(given) & set(blocked) and blocked[0] not in excluded["item_id"].to_list()


def test_similar_items_are_the_cosine_neighbours_of_the_graph_tables(served: Path) -> None:
    model = mfbatch.load(db=served)
    item = rows(served, "SELECT item_id FROM items ORDER BY n_ratings DESC LIMIT 1")[0][0]
    similar = model.similar_items([item], k=3)
    assert similar.columns == ["item_id", "rank", "similar_id", "score"]
    assert similar["rank"].to_list() == [1, 2, 3] and item not in similar["similar_id"]
    scores = similar["score"].to_list()
    assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)


def test_unknown_ids_are_one_line_errors(served: Path) -> None:
    model = mfbatch.load(db=served)
    with pytest.raises(ConfigError, match=r"no user 'nobody'.*histories=") as caught:
        model.recommend(["nobody"], k=5)
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="no item 'nothing'"):
        model.recommend(histories={"v": ["nothing"]})
    with pytest.raises(ConfigError, match="k: must be in"):
        model.recommend(["newcomer"], k=0)


@pytest.mark.parametrize("kind", ["polars", "pandas", "arrow"])
def test_dataframe_sources_give_the_tables_a_file_gives(kind: str, tmp_path: Path) -> None:
    frame = pl.DataFrame(
        {
            "user_id": ["u1", "u1", "u2", "u2", "u3", "u3", "u1"],
            "item_id": ["a", "b", "a", "c", "b", "c", "c"],
            "rating": [5.0, 3.0, 4.0, 2.0, 1.0, 5.0, 4.0],
            "timestamp": [1, 2, 3, 4, 5, 6, 7],
        }
    )
    csv = tmp_path / "r.csv"
    frame.write_csv(csv)
    mfbatch.preprocess(db=tmp_path / "file.duckdb", dataset="csv", source=csv)
    source = {"polars": frame, "pandas": frame.to_pandas(), "arrow": frame.to_arrow()}[kind]
    assert isinstance(source, pl.DataFrame | pd.DataFrame | pa.Table)
    mfbatch.preprocess(db=tmp_path / "frame.duckdb", source=source, time_col="timestamp")
    query = "SELECT u.user_id, i.item_id, rating, split FROM ratings JOIN users u USING " \
            "(user_idx) JOIN items i USING (item_idx) ORDER BY 1, 2"  # fmt: skip
    assert rows(tmp_path / "frame.duckdb", query) == rows(tmp_path / "file.duckdb", query)


def test_a_bad_frame_is_one_line_without_the_frame(tmp_path: Path) -> None:
    frame = pl.DataFrame({"who": [f"user-{n}" for n in range(500)], "what": ["x"] * 500})
    with pytest.raises(InputDataError) as caught:
        mfbatch.preprocess(db=tmp_path / "x.duckdb", source=frame)
    message = str(caught.value)
    assert "\n" not in message and "user-499" not in message and len(message) < 400, message
    assert message.startswith("source (a polars frame): no column 'user_id'"), message


def test_verbose_prints_stamped_progress_and_silent_is_the_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "v.duckdb"
    mfbatch.preprocess(db=path, dataset="synthetic", users=20, items=10, ratings_per_user=4)
    assert capsys.readouterr().err == ""
    mfbatch.train(db=path, export_dir=tmp_path / "e", verbose=True, threads=1, **SMALL)
    lines = unstamped(capsys.readouterr().err)
    assert lines[0].startswith("training on cpu")
    assert sum(line.startswith("epoch ") for line in lines) == 3, lines
