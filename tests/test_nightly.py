"""What a team running mfbatch nightly uses: the Python API, Parquet/CSV out, runs and
history, the HTML report, logs cron can keep. Real CLI and API calls on real files."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pytest
from conftest import cli, ok, recall_from_lists, rows

import mfbatch
from mfbatch.errors import ConfigError
from mfbatch.version import __version__

SMALL = ["--embedding-dim", "8", "--epochs", "2"]


@pytest.fixture(scope="module")
def _pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nightly")
    path = root / "n.duckdb"
    synthetic = ["--users", "50", "--items", "30", "--ratings-per-user", "10"]
    ok(cli("preprocess", "--dataset", "synthetic", *synthetic, "--db", path))
    ok(cli("train", "--db", path, "--export-dir", root / "export", *SMALL))
    ok(cli("evaluate", "--db", path, "--top-k", "5"))
    ok(cli("train", "--db", path, "--export-dir", root / "export", "--on", "all"))
    ok(cli("score", "--db", path, "--top-k", "5"))
    return path


@pytest.fixture
def db(_pipeline: Path, tmp_path: Path) -> Path:
    shutil.copytree(_pipeline.parent, tmp_path / "w")
    return tmp_path / "w" / "n.duckdb"


def runs_by_role(path: Path) -> dict[str, str]:
    return dict(rows(path, "SELECT data_seen, run_id FROM training_runs"))


# --- the Python API ----------------------------------------------------------------------


def test_the_api_runs_every_stage(tmp_path: Path) -> None:
    path = tmp_path / "mfbatch.duckdb"
    prepared = mfbatch.preprocess(
        db=path,
        dataset="synthetic",
        users=40,
        items=25,
        ratings_per_user=8,
        split={"kind": "user-time", "val_fraction": 0.2},
    )
    assert 0 < prepared.n_users <= 40 and path.exists()
    trained = mfbatch.train(db=path, embedding_dim=8, epochs=2, export_dir=tmp_path / "export")
    assert trained.data_seen == "train"
    figures = mfbatch.evaluate(db=path, top_k=5)
    assert figures.run_id == trained.run_id
    # Recall@5 against the same figure worked out from the stored lists; strictly between
    # 0 and 1 here, so a metric stuck at 0 or at 1 cannot pass.
    expected = recall_from_lists(path, trained.run_id, "model", 5)
    assert 0.05 < expected < 0.95, expected
    assert figures.model["recall"] == pytest.approx(expected, rel=1e-9)
    refit = mfbatch.train(db=path, on="all", export_dir=tmp_path / "export")
    served = mfbatch.score(db=path, top_k=5)
    assert served.run_id == refit.run_id and served.rows > 0
    lists = mfbatch.read_lists(db=path)
    assert lists.height == served.rows
    assert lists.columns == [
        "run_id", "user_id", "item_id", "rank", "score", "predicted_rating", "source",
        "created_at",
    ]  # fmt: skip
    table = pl.DataFrame(
        rows(path, "SELECT user_id, item_id, rank FROM recommendations ORDER BY user_id, rank"),
        schema=["user_id", "item_id", "rank"],
        orient="row",
    )
    assert lists.select("user_id", "item_id", "rank").cast({"rank": pl.Int64}).equals(table)
    user = lists["user_id"][0]
    assert [
        r.item_id for r in mfbatch.recommend(db=path, user_id=user).recommendations
    ] == lists.filter(pl.col("user_id") == user)["item_id"].to_list()
    assert [r.run_id for r in mfbatch.list_runs(db=path)] == [refit.run_id, trained.run_id]

    # The daily cycle through the API: a new user's ratings appended, then folded in.
    new = tmp_path / "new.csv"
    items = lists["item_id"].unique().sort().to_list()[:5]
    new.write_text(
        "user_id,item_id,rating,timestamp\n"
        + "".join(f"newcomer,{item},5,{2_000_000_000 + n}\n" for n, item in enumerate(items))
    )
    appended = mfbatch.append(db=path, dataset="csv", source=new)
    assert appended.new_users == 1
    mfbatch.score(db=path, top_k=5)
    newcomer = mfbatch.recommend(db=path, user_id="newcomer")
    assert {r.source for r in newcomer.recommendations} == {"fold-in"}
    assert not {r.item_id for r in newcomer.recommendations} & set(items)


def test_the_api_checks_keywords_like_flags(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="epochs: expected a whole number"):
        mfbatch.train(db=tmp_path / "x.duckdb", epochs="3")
    with pytest.raises(ConfigError, match="unknown key"):
        mfbatch.score(db=tmp_path / "x.duckdb", topk=5)


# --- outputs a warehouse reads -------------------------------------------------------------


def test_parquet_csv_and_folder_outputs_equal_the_table(db: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    ok(cli("score", "--db", db, "--top-k", "5", "--output", out / "lists.parquet"))
    served = mfbatch.read_lists(db=db)
    from_parquet = pl.read_parquet(out / "lists.parquet")
    assert from_parquet.equals(served)
    assert dict(from_parquet.schema) == {
        "run_id": pl.String,
        "user_id": pl.String,
        "item_id": pl.String,
        "rank": pl.Int32,
        "score": pl.Float64,
        "predicted_rating": pl.Float64,
        "source": pl.String,
        "created_at": pl.Datetime("us"),
    }
    result = ok(cli("export-lists", "--db", db, "--output", out / "lists.csv"))
    assert result.stdout.strip() == f"wrote {served.height:,} rows to {out / 'lists.csv'}"
    from_csv = pl.read_csv(out / "lists.csv", schema=served.schema)
    assert from_csv.select("user_id", "item_id", "rank").equals(
        served.select("user_id", "item_id", "rank")
    )
    ok(cli("export-lists", "--db", db, "--output", out / "dataset"))
    parts = list((out / "dataset").glob("run_id=*/*.parquet"))
    assert parts
    dataset = pl.read_parquet(out / "dataset", hive_partitioning=True)
    assert sorted(dataset["item_id"].to_list()) == sorted(served["item_id"].to_list())
    assert not list(out.glob(".*partial"))
    bad = cli("export-lists", "--db", db, "--output", out / "lists.xlsx")
    assert bad.exit_code == 2 and "--output" in bad.stderr


# --- runs, promotion, history ----------------------------------------------------------------


def test_runs_listing_and_promotion(db: Path) -> None:
    roles = runs_by_role(db)
    listing = json.loads(ok(cli("runs", "--db", db, "--json")).stdout)
    assert [r["run_id"] for r in listing] == [roles["train+val"], roles["train"]]
    by_id = {r["run_id"]: r for r in listing}
    assert by_id[roles["train+val"]]["served_users"] == 50
    assert by_id[roles["train"]]["val_recall"] is not None
    assert not any(r["promoted"] for r in listing)
    table = ok(cli("runs", "--db", db)).stdout
    assert roles["train"][:8] in table and table.rstrip().endswith(f"2 runs in {db}")

    ok(cli("serve", "--db", db, "--run-id", roles["train"]))
    result = ok(cli("score", "--db", db, "--top-k", "5"))
    assert f"with run {roles['train']} (validated on train)" in result.stdout
    listing = json.loads(ok(cli("runs", "--db", db, "--json")).stdout)
    assert [r["run_id"] for r in listing if r["promoted"]] == [roles["train"]]
    ok(cli("serve", "--db", db, "--clear"))
    assert f"with run {roles['train+val']}" in ok(cli("score", "--db", db, "--top-k", "5")).stdout
    bad = cli("serve", "--db", db, "--run-id", "no-such-run")
    assert bad.exit_code == 2 and "no-such-run" in bad.stderr


def test_history_keeps_what_the_retention_says_and_diffs_two_nights(db: Path) -> None:
    roles = runs_by_role(db)
    for run in (roles["train"], roles["train+val"], roles["train"]):
        ok(cli("score", "--db", db, "--top-k", "5", "--run-id", run, "--keep-history", "2"))
    kept = rows(db, "SELECT DISTINCT publish_id, run_id FROM recommendation_history ORDER BY 1")
    assert kept == [(3, roles["train+val"]), (4, roles["train"])]
    # Each publish is the whole served table at that moment.
    (count,), *_ = rows(db, "SELECT count(*) FROM recommendation_history WHERE publish_id = 4")
    assert count == rows(db, "SELECT count(*) FROM recommendations")[0][0]

    report = json.loads(ok(cli("diff", "--db", db, "--json")).stdout)
    assert (report["before"], report["after"]) == (3, 4)
    assert report["users_compared"] == 50 and report["users_added"] == 0
    before = {
        (u, i)
        for u, i in rows(
            db, "SELECT user_id, item_id FROM recommendation_history WHERE publish_id = 3"
        )
    }
    after = {
        (u, i)
        for u, i in rows(
            db, "SELECT user_id, item_id FROM recommendation_history WHERE publish_id = 4"
        )
    }
    changed = {u for u, _ in before ^ after}
    items_before, items_after = {i for _, i in before}, {i for _, i in after}
    assert report["items_entered"] == sorted(items_after - items_before)
    assert report["items_left"] == sorted(items_before - items_after)
    assert report["users_changed"] >= len(changed)
    line = ok(cli("diff", "--db", db)).stdout.rstrip().splitlines()[-1]
    assert line.startswith("publish 3 -> 4: ")
    bad = cli("diff", "--db", db, "--before", "1")
    assert bad.exit_code == 2 and "no publish 1 kept" in bad.stderr


# --- logs cron can keep -------------------------------------------------------------------------


def test_every_command_has_json_and_quiet(db: Path, tmp_path: Path) -> None:
    user = rows(db, "SELECT user_id FROM users LIMIT 1")[0][0]
    commands = [
        ["preprocess", "--dataset", "synthetic", "--users", "50", "--items", "30",
         "--ratings-per-user", "10", "--db", tmp_path / "fresh.duckdb"],
        ["train", "--db", tmp_path / "fresh.duckdb", "--export-dir", tmp_path / "ex", *SMALL],
        ["evaluate", "--db", db, "--top-k", "5"],
        ["score", "--db", db, "--top-k", "5"],
        ["export", "--db", db],
        ["recommend", "--db", db, "--user", user],
        ["export-lists", "--db", db, "--output", tmp_path / "l.parquet"],
        ["report", "--db", db, "--out", tmp_path / "r.html"],
    ]  # fmt: skip
    for command in commands:
        as_json = ok(cli(*command, "--json"))
        lines = as_json.stdout.strip().splitlines()
        assert len(lines) == 1, (command, as_json.stdout)
        assert isinstance(json.loads(lines[0]), dict), command
        assert as_json.stderr == "", (command, as_json.stderr)
    for command in commands:
        quiet = ok(cli(*command, "--quiet"))
        assert quiet.stderr == "", (command, quiet.stderr)
        assert len(quiet.stdout.strip().splitlines()) == 1, (command, quiet.stdout)


def test_score_prints_a_line_per_tenth_when_not_on_a_terminal(db: Path) -> None:
    result = ok(cli("score", "--db", db, "--top-k", "5", "--batch-size", "5"))
    lines = [line for line in result.log_lines if line.startswith("score: ")]
    shares = [int(re.match(r"score:\s+(\d+)%", line).group(1)) for line in lines]  # type: ignore[union-attr]
    assert shares == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert all("users/s" in line for line in lines)
    assert result.stdout.strip().splitlines()[-1].startswith("scored 50 users")


def test_recommend_for_several_users_with_n(db: Path) -> None:
    served = rows(db, "SELECT user_id, item_id FROM recommendations WHERE rank <= 3 ORDER BY rank")
    first, second = sorted({user for user, _ in served})[:2]
    text = ok(cli("recommend", "--db", db, "--user", first, "--user", second, "-n", "3")).stdout
    summaries = [line for line in text.splitlines() if line.startswith("user ")]
    assert [line.split(":")[0] for line in summaries] == [f"user {first}", f"user {second}"]
    assert all(" 3 recommendations " in line for line in summaries), summaries
    answer = json.loads(ok(cli("recommend", "--db", db, "--user", first, "--user", second,
                               "-n", "3", "--json")).stdout)  # fmt: skip
    for user in answer["users"]:
        listed = [r["item_id"] for r in user["recommendations"]]
        assert listed == [item for u, item in served if u == user["user_id"]]
    bad = cli("recommend", "--db", db, "--user", first, "--user", "nobody")
    assert bad.exit_code == 2 and "nobody" in bad.stderr and "user " not in bad.stdout
    typo = cli("recommend", "--db", db, "--user", f"{first}x")
    assert typo.exit_code == 2 and f"did you mean {first!r}" in typo.stderr, typo.stderr


def test_version() -> None:
    assert ok(cli("--version")).stdout.strip() == f"mfbatch {__version__}"


# --- the report ---------------------------------------------------------------------------------


def _non_blank_png(data: bytes) -> bool:
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("L")
    low, high = image.getextrema()
    return image.width > 100 and image.height > 100 and high - low > 100


def test_report_is_self_contained_with_every_figure(db: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    result = ok(cli("report", "--db", db, "--out", out))
    assert result.stdout.strip().endswith(f"4 figures -> {out}")
    page = out.read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page  # nothing to fetch
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 4
    assert all(_non_blank_png(base64.b64decode(image)) for image in images)
    for caption in ("Training curves", "popularity", "Long tail", "Score distribution"):
        assert caption in page
    # Each figure has a sentence on how to read it, not only a title.
    captions = re.findall(r"<figcaption><b>([^<]+)</b>([^<]+)</figcaption>", page)
    assert len(captions) == 4 and all(len(how) > 100 for _, how in captions), captions
    run = runs_by_role(db)["train"]
    (best,) = rows(db, "SELECT best_epoch FROM training_runs WHERE run_id = $r", r=run)[0]
    assert f"the best epoch ({best})" in page
    # Named with their K, a lift column, counts as a sentence; a softmax run has no RMSE.
    assert "<th>lift</th>" in page and "<td>Recall@5</td>" in page and "x</td>" in page
    assert "users_without_relevant" not in page and "users_evaluated" not in page
    evaluated = "SELECT value FROM evaluations WHERE run_id = $r AND metric = 'users_evaluated'"
    (users,) = rows(db, evaluated, r=run)[0]
    assert f"Measured over {int(users):,} users" in page
    # Outside the figures: base64 text holds any four letters now and then.
    assert "RMSE" not in re.sub(r'src="data:image/png;base64,[^"]+"', "", page)
    bad = cli("report", "--db", db, "--run-id", runs_by_role(db)["train+val"], "--out", out)
    assert bad.exit_code == 5 and "refit" in bad.stderr


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed in CI)")
def test_report_renders_in_a_real_browser(db: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    ok(cli("report", "--db", db, "--out", out))
    shot = tmp_path / "shot.png"
    assert CHROMIUM is not None
    subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1200,2600", f"--screenshot={shot}", out.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )  # fmt: skip
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2600)
    # The figures are drawn: matplotlib's default blue and orange are on the page.
    colours = {colour for _, colour in image.getcolors(maxcolors=1 << 20) or []}
    assert (31, 119, 180) in colours and (255, 127, 14) in colours


def test_short_stages_print_a_line_per_step_when_not_on_a_terminal(
    db: Path, tmp_path: Path
) -> None:
    fresh = tmp_path / "f.duckdb"
    result = ok(cli("preprocess", "--dataset", "synthetic", "--users", "20", "--items", "10",
                    "--ratings-per-user", "4", "--db", fresh))  # fmt: skip
    steps = [re.sub(r"\d+ rows", "N rows", line.split(" (")[0]) for line in result.log_lines]
    assert steps == ["preprocess: reading synthetic", "preprocess: preparing N rows",
                     f"preprocess: writing {fresh}"]  # fmt: skip
    assert result.stdout.strip().splitlines()[-1].startswith("preprocessed ")
    evaluated = ok(cli("evaluate", "--db", db, "--top-k", "5"))
    assert evaluated.log_lines[0].startswith("evaluate: listing ")
    assert evaluated.stdout.strip().splitlines()[-1].startswith("evaluated run ")
