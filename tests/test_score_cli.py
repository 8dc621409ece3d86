"""`mfbatch score` and `mfbatch export` end to end through the CLI, on real DuckDB files:
what a successful run writes.

One small dataset is preprocessed and trained twice per session (a validated run, then a
refit on all data: the `ws` fixture in conftest.py); each test works on its own copy.
"""

from __future__ import annotations

import onnx
import pytest
import torch
from conftest import (
    N_ITEMS,
    N_USERS,
    Workspace,
    _by_user,
    _check_lists,
    _ids,
    _rated,
    cli,
)
from conftest import rows as _rows
from conftest import tables as _tables

from mfbatch.artifact.files import load_model, read_metadata

# --- What a successful run writes --------------------------------------------------------------


def test_score_writes_the_top_k_unrated_items_of_every_user(ws: Workspace) -> None:
    k = 30  # more than some users have left, fewer than others
    result = ws.score("--top-k", str(k), "--batch-size", "7")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(
        f"scored {N_USERS} users with run {ws.refit} (refit on train+val) on cpu"
    )
    assert "popularity" not in result.stdout  # a refit trained every user
    assert "(recommendations replaced, publish 1)" in result.stdout
    assert "Traceback" not in result.stderr

    rated = _rated(ws.db, ("train", "val"))
    grouped = _check_lists(ws, run_id=ws.refit, k=k, excluded=rated)
    counts = {len(rows) for rows in grouped.values()}
    assert k in counts and min(counts) < k  # both cases really occur
    total = sum(len(rows) for rows in grouped.values())
    assert f"{total:,} recommendations" in result.stdout
    assert "recommendations_staging" not in _tables(ws.db)
    assert not list(ws.root.glob(".mfbatch-score-*"))

    # The scores are the saved torch model's predictions, and nothing better was left out.
    model, manifest = load_model(ws.export_path(ws.refit))
    users = {v: k for k, v in _ids(ws.db, "users").items()}
    items = {v: k for k, v in _ids(ws.db, "items").items()}
    with torch.no_grad():
        truth = (
            model(
                torch.arange(N_USERS).repeat_interleave(N_ITEMS),
                torch.arange(N_ITEMS).repeat(N_USERS),
            )
            .reshape(N_USERS, N_ITEMS)
            .double()
            .numpy()
        )
    lo, hi = manifest["rating_min"], manifest["rating_max"]
    for user, rows in grouped.items():
        u = users[user]
        assert {r[7] for r in rows} == {"model"}
        for _, _, item, _, score, predicted, _, _ in rows:
            assert score == pytest.approx(truth[u, items[item]], abs=1e-5)
            assert predicted == pytest.approx(min(max(score, 0.0), 1.0) * (hi - lo) + lo)
            assert lo <= predicted <= hi
        unrated = set(items) - rated[user] - {r[2] for r in rows}
        if unrated:
            assert max(truth[u, items[i]] for i in unrated) <= rows[-1][4] + 1e-5
    assert len({r[6] for r in ws.recommendations()}) == 1  # one created_at per run


def test_rescoring_replaces_the_table(ws: Workspace) -> None:
    assert ws.score("--top-k", "5").exit_code == 0
    result = ws.score("--top-k", "3", "--run-id", ws.validated)
    assert result.exit_code == 0, result.stderr
    rows = ws.recommendations()
    assert {r[0] for r in rows} == {ws.validated}
    assert max(r[3] for r in rows) == 3
    assert _tables(ws.db) >= {"recommendations"} and "recommendations_staging" not in _tables(ws.db)


def test_users_file_updates_only_those_users(ws: Workspace) -> None:
    assert ws.score("--top-k", "5").exit_code == 0
    before = _by_user(ws.recommendations())
    chosen = sorted(_ids(ws.db, "users").values())[5:8]
    result = ws.score(
        "--top-k", "4", "--run-id", ws.validated, "--users", ws.write_ids("users.txt", chosen)
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("scored 3 users")
    assert "updated for these users" in result.stdout
    after = _by_user(ws.recommendations())
    # Everyone else's list is exactly as it was; the chosen users have new ones.
    assert set(after) == set(before)
    for user, rows in after.items():
        if user in chosen:
            assert len(rows) == 4 and {r[0] for r in rows} == {ws.validated}
        else:
            assert rows == before[user]
    rated = _rated(ws.db, ("train", "val"))
    assert not any(r[2] in rated[r[1]] for r in ws.recommendations())


def test_include_and_exclude_items(ws: Workspace) -> None:
    item_ids = sorted(_ids(ws.db, "items").values())
    rated = _rated(ws.db, ("train", "val"))

    excluded = item_ids[::3]
    result = ws.score("--top-k", "35", "--exclude-items", ws.write_ids("deny.txt", excluded))
    assert result.exit_code == 0, result.stderr
    _check_lists(ws, run_id=ws.refit, k=35, excluded=rated, allowed=set(item_ids) - set(excluded))

    included = item_ids[:9]
    result = ws.score("--top-k", "5", "--include-items", ws.write_ids("allow.txt", included))
    assert result.exit_code == 0, result.stderr
    grouped = _check_lists(ws, run_id=ws.refit, k=5, excluded=rated, allowed=set(included))
    assert any(len(rows) < 5 for rows in grouped.values())  # the allow list ran short

    allow = ws.write_ids("allow.txt", included)
    deny = ws.write_ids("deny.txt", included[:2])
    result = ws.score("--top-k", "5", "--include-items", allow, "--exclude-items", deny)
    assert result.exit_code == 0, result.stderr
    _check_lists(ws, run_id=ws.refit, k=5, excluded=rated, allowed=set(included[2:]))


def test_where_keeps_the_items_a_predicate_on_items_holds_for(ws: Workspace) -> None:
    rated = _rated(ws.db, ("train", "val"))
    (median,) = _rows(ws.db, "SELECT median(n_ratings)::INT FROM items")[0]
    query = "SELECT item_id FROM items WHERE n_ratings <= $m"
    chosen = {i for (i,) in _rows(ws.db, query, m=median)}
    assert 5 < len(chosen) < N_ITEMS  # the predicate does cut
    result = ws.score("--top-k", "5", "--where", f"n_ratings <= {median}")
    assert result.exit_code == 0, result.stderr
    _check_lists(ws, run_id=ws.refit, k=5, excluded=rated, allowed=chosen)

    before = ws.recommendations()
    # One expression on items' columns, nothing else: a statement, an unknown column and
    # an empty selection are one-line errors, and nothing is published or dropped.
    for predicate, fragment in (
        ("1 = 1; DROP TABLE items", "--where"),
        ("no_such_column > 1", "no_such_column"),
        ("n_ratings < 0", "no item matches"),
    ):
        bad = ws.score("--top-k", "5", "--where", predicate)
        assert bad.exit_code == 2 and fragment in bad.stderr, bad.stderr
        assert len(bad.error_lines) == 1 and bad.error_lines[0].startswith("error: --where")
    assert ws.recommendations() == before
    assert _rows(ws.db, "SELECT count(*) FROM items")[0][0] == N_ITEMS


def test_every_served_run_excludes_every_rated_item(ws: Workspace) -> None:
    """Whatever run is served, no list holds an item the user rated in any split; users the
    run never trained get the popularity list, items it never trained are not offered."""
    k = N_ITEMS
    rated = _rated(ws.db, ("train", "val"))
    assert ws.score("--top-k", str(k)).exit_code == 0
    _check_lists(ws, run_id=ws.refit, k=k, excluded=rated)

    result = ws.score("--top-k", str(k), "--run-id", ws.validated)
    assert result.exit_code == 0, result.stderr
    assert "(validated on train)" in result.stdout
    train_users = {u for (u,) in _rows(ws.db, "SELECT user_id FROM users WHERE n_train > 0")}
    untrained_items = {i for (i,) in _rows(ws.db, "SELECT item_id FROM items WHERE n_train = 0")}
    cold = set(_ids(ws.db, "users").values()) - train_users
    assert cold, "the default time split leaves some users without train ratings"
    assert f"{len(cold)} of them from popularity" in result.stdout
    excluded = {u: rated[u] | untrained_items for u in _ids(ws.db, "users").values()}
    grouped = _check_lists(ws, run_id=ws.validated, k=k, excluded=excluded)
    popularity = dict(_rows(ws.db, "SELECT item_id, n_ratings FROM items WHERE n_train > 0"))
    for user, rows in grouped.items():
        assert {r[7] for r in rows} == {"popularity" if user in cold else "model"}, user
        if user in cold:
            # Most rated first (over every split), and the score says how often.
            assert [r[4] for r in rows] == [float(popularity[r[2]]) for r in rows]
            assert all(r[5] is None for r in rows)


def test_export_rewrites_model_onnx(ws: Workspace) -> None:
    path = ws.export_path(ws.validated) / "model.onnx"
    original = path.read_bytes()
    path.write_bytes(b"overwritten by something else")
    result = cli("export", "--db", ws.db, "--run-id", ws.validated)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == f"exported {path}"
    onnx.checker.check_model(str(path), full_check=True)
    assert read_metadata(path)["run_id"] == ws.validated
    assert onnx.load_model(str(path)).graph == onnx.load_model_from_string(original).graph
    assert not list(path.parent.glob("*.part"))

    path.unlink()  # a lost file comes back too, and scores again
    assert cli("export", "--db", ws.db, "--run-id", ws.validated).exit_code == 0
    assert path.is_file()
    assert ws.score("--top-k", "3", "--run-id", ws.validated).exit_code == 0

    latest = ws.export_path(ws.refit) / "model.onnx"
    latest.unlink()
    result = cli("export", "--db", ws.db)
    assert result.exit_code == 0 and result.stdout.strip() == f"exported {latest}"
    assert read_metadata(latest)["run_id"] == ws.refit
