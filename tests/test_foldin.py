"""Fold-in: the solves against oracles, the user-rows graph against the trained-user graph,
and a real trained model's users folded back in from their own ratings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import duckdb
import numpy as np
import onnx
import pytest
from conftest import cli_ok
from onnx import numpy_helper

from mfbatch.artifact.graph import build_graph
from mfbatch.serving.csr import SeenItems
from mfbatch.serving.foldin import fold_in, fold_in_prior, item_tables, method_for
from mfbatch.serving.session import Scorer


def _tables(rng: np.random.Generator, n_items: int, d: int) -> np.ndarray:
    q = rng.normal(0, 0.5, (n_items, d))
    b = rng.normal(0, 0.3, n_items)
    return np.concatenate([q.T, b[None], np.ones((1, n_items))]).astype(np.float32)


def _csr(lists: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64)
    return indptr, np.concatenate(lists).astype(np.int64)


def _softmax_gradient(
    p: np.ndarray, items: np.ndarray, v: np.ndarray, l2: float, w: np.ndarray | None = None
) -> np.ndarray:
    q, b = item_tables(v.astype(np.float64))
    w = np.ones(len(items)) if w is None else w.astype(np.float64)
    logits = q @ p + b
    pi = np.exp(logits - logits.max())
    pi /= pi.sum()
    return (w[:, None] * q[items]).sum(0) - w.sum() * (pi @ q) - l2 * p


def _newton(items: np.ndarray, v: np.ndarray, l2: float, w: np.ndarray, steps: int = 30):
    """The exact optimum of sum_R w_i log softmax(p.q + b)_i - l2/2 |p|^2 (concave in p):
    full Newton steps from 0, the oracle the fast solve is held to."""
    q, b = item_tables(v.astype(np.float64))
    p = np.zeros(q.shape[1])
    for _ in range(steps):
        logits = q @ p + b
        pi = np.exp(logits - logits.max())
        pi /= pi.sum()
        mean = pi @ q
        cov = (q * pi[:, None]).T @ q - np.outer(mean, mean)
        hess = w.sum() * cov + l2 * np.eye(len(p))
        p = p + np.linalg.solve(hess, _softmax_gradient(p, items, v, l2, w))
    return p


@pytest.mark.parametrize("weighted", [False, True])
def test_the_fast_solve_reaches_the_weighted_softmax_optimum(weighted: bool) -> None:
    rng = np.random.default_rng(0)
    v = _tables(rng, 200, 6)
    lists = [np.sort(rng.choice(200, size=n, replace=False)) for n in (1, 5, 30, 80)]
    indptr, items = _csr(lists)
    ones = np.ones(len(items), dtype=np.float32)
    w = rng.uniform(0.2, 3.0, len(items)).astype(np.float32) if weighted else ones
    fast = fold_in(indptr, items, ones, v, method="softmax", l2=2.0, steps=60, weights=w)
    for row, chosen, lo, hi in zip(fast, lists, indptr[:-1], indptr[1:], strict=True):
        exact = _newton(chosen, v, 2.0, w[lo:hi].astype(np.float64))
        assert np.linalg.norm(_softmax_gradient(exact, chosen, v, 2.0, w[lo:hi])) < 1e-6
        np.testing.assert_allclose(row[:6], exact, atol=2e-3)
    assert (fast[:, 6] == 1.0).all()
    if weighted:  # the weights move the solution: they are not ignored
        plain = fold_in(indptr, items, ones, v, method="softmax", l2=2.0, steps=60)
        assert np.abs(plain[:, :6] - fast[:, :6]).max() > 1e-2


def test_the_prior_is_trainings_frequency_l2_on_the_users_row() -> None:
    # Training's L2 on a user's row is λ Σ w_i² (the weights it was last fitted under) in a
    # per-rating loss: the fold-in's half-scaled solve must land on the optimum at
    # l2 = 2 λ Σ pw_i², per user, not on one constant for everyone.
    rng = np.random.default_rng(1)
    v = _tables(rng, 200, 6)
    lists = [np.sort(rng.choice(200, size=n, replace=False)) for n in (1, 5, 30, 80)]
    indptr, items = _csr(lists)
    ones = np.ones(len(items), dtype=np.float32)
    w = rng.uniform(0.2, 3.0, len(items)).astype(np.float32)
    pw = rng.uniform(0.1, 4.0, len(items)).astype(np.float32)
    fast = fold_in(indptr, items, ones, v, steps=60, weights=w, frequency_l2=0.05, prior_weights=pw)
    priors = []
    for row, chosen, lo, hi in zip(fast, lists, indptr[:-1], indptr[1:], strict=True):
        prior = 2 * 0.05 * float(np.square(pw[lo:hi].astype(np.float64)).sum())
        priors.append(prior)
        exact = _newton(chosen, v, prior, w[lo:hi].astype(np.float64))
        np.testing.assert_allclose(row[:6], exact, atol=2e-3)
    assert max(priors) / min(priors) > 50  # the users' priors differ: one constant can't pass
    # Without prior weights the data's own weights count; a user with nothing usable keeps
    # a zero vector (no 0/0).
    usable = np.ones(200, dtype=bool)
    usable[lists[0]] = False
    own = fold_in(indptr, items, ones, v, steps=60, weights=w, frequency_l2=0.05, usable=usable)
    assert np.isfinite(own).all() and not own[0, :6].any()
    lo, hi = indptr[2], indptr[3]
    exact = _newton(lists[2], v, 0.1 * float(np.square(w[lo:hi]).sum()), w[lo:hi])
    np.testing.assert_allclose(own[2, :6], exact, atol=2e-3)


@pytest.mark.parametrize(
    ("train", "prior"),
    [
        ({"l2": 0.05, "l2_mode": "frequency", "user_half_life": 0.05, "recency_half_life": 0.3},
         (0.05, 0.05)),
        ({"l2": 0.16, "user_half_life": 0.0, "recency_half_life": 0.0}, (0.16, 0.0)),
        ({"l2": 0.05, "recency_half_life": 0.3}, (0.05, 0.3)),
        ({"l2": 0.05, "l2_mode": "plain"}, (None, 0.0)),
        ({"l2": 0.03, "objective": "rating"}, (None, 0.0)),
        ({"l2": None}, (None, 0.0)),
        ({"l2": True}, (None, 0.0)),
    ],
)  # fmt: skip
def test_the_prior_follows_the_runs_recorded_l2(train: dict, prior: tuple) -> None:
    assert fold_in_prior(train) == prior


def test_serving_recency_weights_equal_trainings() -> None:
    import torch

    from mfbatch.serving.foldin import recency_weights as serving
    from mfbatch.training.objectives import recency_weights as training

    rng = np.random.default_rng(5)
    users = rng.integers(0, 30, 600)
    ts = rng.integers(0, 40, 600)  # many ties: tied ratings share a weight
    for half_life in (0.0, 0.1, 0.2, 1.0):
        mine = serving(users, ts, half_life)
        theirs = training(torch.from_numpy(users), torch.from_numpy(ts), 30, half_life)
        np.testing.assert_allclose(mine, theirs.numpy(), rtol=1e-6)
    assert serving(users, ts, 0.2).std() > 0.1


def test_ridge_recovers_noise_free_ratings_exactly() -> None:
    rng = np.random.default_rng(1)
    v = _tables(rng, 120, 5)
    q, b = item_tables(v)
    truth_p = rng.normal(0, 0.4, (3, 5))
    truth_c = np.array([0.2, -0.1, 0.5])
    lists = [np.sort(rng.choice(120, size=40, replace=False)) for _ in range(3)]
    indptr, items = _csr(lists)
    users = np.repeat(np.arange(3), 40)
    ratings = (q[items] * truth_p[users]).sum(1) + b[items] + truth_c[users]
    rows = fold_in(indptr, items, ratings.astype(np.float32), v, method="ridge", l2=1e-6)
    np.testing.assert_allclose(rows[:, :5], truth_p, atol=1e-3)
    np.testing.assert_allclose(rows[:, 6], truth_c, atol=1e-3)
    assert (rows[:, 5] == 1.0).all()


def test_items_the_model_cannot_speak_for_are_left_out_of_the_solve() -> None:
    rng = np.random.default_rng(2)
    v = _tables(rng, 50, 4)
    usable = np.ones(50, dtype=bool)
    usable[[3, 7]] = False
    # Item 60 is beyond the model's tables (appended since), 3 and 7 never trained.
    with_extra = fold_in(*_csr([np.array([1, 3, 7, 9, 60])]), np.ones(5), v, usable=usable)
    plain = fold_in(*_csr([np.array([1, 9])]), np.ones(2), v, usable=usable)
    np.testing.assert_array_equal(with_extra, plain)
    # A user left with nothing usable gets the zero vector: ranked by item bias alone.
    nothing = fold_in(*_csr([np.array([3, 60])]), np.ones(2), v, usable=usable)
    np.testing.assert_array_equal(nothing[0, :4], 0.0)


@pytest.mark.parametrize("graph", ["split", "whole"])
def test_a_user_given_as_a_row_is_scored_exactly_like_the_trained_user(
    tmp_path: Path, graph: str
) -> None:
    rng = np.random.default_rng(3)
    n_users, n_items, d = 30, 70, 6
    v = _tables(rng, n_items, d)
    u = np.concatenate(
        [rng.normal(0, 0.5, (n_users, d)), np.ones((n_users, 1)), rng.normal(0, 1, (n_users, 1))],
        axis=1,
    ).astype(np.float32)
    path = tmp_path / "model.onnx"
    onnx.save_model(build_graph(u, v, {"run_id": "t"}), str(path))
    scorer = Scorer(path, provider="cpu", threads=1, graph=graph)
    lists = [np.sort(rng.choice(n_items, size=5, replace=False)) for _ in range(n_users)]
    indptr, items = _csr(lists)
    seen = SeenItems(indptr, items)
    # The database has grown by 10 items since: the mask is longer than the model's tables.
    mask = np.zeros(n_items + 10, dtype=np.float32)
    mask[[0, 5]] = -np.inf
    users = np.arange(n_users, dtype=np.int64)
    by_index = scorer.top_k(users, seen, mask, 12)
    by_row = scorer.top_k_rows(users, u, seen, mask, 12)
    np.testing.assert_array_equal(by_index[0], by_row[0])
    np.testing.assert_array_equal(by_index[1], by_row[1])
    assert by_row[0].max() < n_items
    assert not np.isin(by_row[0], [0, 5]).any()


@pytest.mark.parametrize("objective", [[], ["--objective", "rating"]], ids=["default", "rating"])
def test_users_the_model_trained_on_fold_back_in_to_lists_like_their_own(
    tmp_path: Path, objective: list[str]
) -> None:
    """A trained user's vector, solved again from their ratings against the frozen items,
    ranks like the trained one (top-20 overlap on a synthetic low-rank set)."""
    db = tmp_path / "mf.duckdb"
    for args in (
        ["preprocess", "--dataset", "synthetic", "--users", "300", "--items", "200",
         "--ratings-per-user", "30", "--split", "user-time", "--val-fraction", "0.1"],
        ["train", *objective, "--embedding-dim", "16", "--epochs", "15", "--on", "train",
         "--export-dir", str(tmp_path / "export")],
        ["train", "--on", "all", "--export-dir", str(tmp_path / "export")],
    ):  # fmt: skip
        cli_ok(*args, "--db", db)
    con = duckdb.connect(str(db), read_only=True)
    (export, trained_for), *_ = con.execute(
        "SELECT export_path, objective FROM training_runs WHERE data_seen = 'train+val'"
    ).fetchall()
    r = con.execute(
        "SELECT user_idx, item_idx, rating_norm FROM ratings ORDER BY user_idx, item_idx"
    ).fetchnumpy()
    con.close()
    proto = onnx.load_model(str(tmp_path / export / "model.onnx"))
    tables = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    u, v = tables["U_aug"], tables["V_aug_t"]
    n_users, n_items = u.shape[0], v.shape[1]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(r["user_idx"], minlength=n_users))])
    seen = SeenItems(indptr, r["item_idx"].astype(np.int64))
    trained_items = np.zeros(n_items, dtype=bool)
    trained_items[r["item_idx"]] = True
    folded = fold_in(
        indptr,
        r["item_idx"],
        r["rating_norm"],
        v,
        method=method_for(trained_for),
        usable=trained_items,
    )
    mask = np.where(trained_items, 0.0, -np.inf).astype(np.float32)
    path = tmp_path / export / "model.onnx"
    scorer = Scorer(path, provider="cpu", threads=1)
    users = np.arange(n_users, dtype=np.int64)
    own, _ = scorer.top_k(users, seen, mask, 20)
    again, _ = scorer.top_k_rows(users, folded, seen, mask, 20)
    overlap = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(own, again, strict=True)])
    # Measured 0.93 (default objective) and 0.60 (rating, ridge); unrelated lists of 20 of
    # ~200 items share about 2.
    assert overlap >= (0.85 if trained_for != "rating" else 0.5), (trained_for, overlap)


def test_fold_in_solves_the_runs_tempered_loss() -> None:
    """A run trained at temperature T had logits (p.q + b) / T: the folded row is the
    optimum of that loss, scored as p.q + b like a trained user's."""
    from mfbatch.serving.engines import FoldIn, apply_fold_in
    from mfbatch.serving.lists import ListPlan

    rng = np.random.default_rng(7)
    v = _tables(rng, 120, 5)
    chosen = np.sort(rng.choice(120, size=25, replace=False))
    indptr, items = _csr([chosen])
    ones = np.ones(len(items), dtype=np.float32)
    plan = ListPlan(
        users=np.array([0]),
        seen=SeenItems(indptr, items),
        item_mask=np.zeros(120, dtype=np.float32),
        cold=np.zeros(1, dtype=bool),
        popularity=np.zeros(120, dtype=np.int64),
        k=5,
        folded=np.array([0]),
    )
    fold = FoldIn(np.array([0]), SeenItems(indptr, items), ones, np.ones(120, dtype=bool))
    for temperature in (1.0, 0.5, 2.0):
        tempered = v.copy()
        tempered[:-1] /= temperature
        exact = _newton(chosen, tempered, 10.0, np.ones(len(chosen)))
        folded = apply_fold_in(
            plan, dataclasses.replace(fold, temperature=temperature), v, "softmax"
        ).folded_rows
        assert folded is not None
        # Two shared-Hessian steps (the served solve) land near the exact optimum.
        assert np.linalg.norm(folded[0, :5] - exact) < 0.05 * np.linalg.norm(exact)
