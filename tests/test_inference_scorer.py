"""The Scorer: properties of the published rows on random problems (unseen, allowed, ranked,
complete) and the session set-up (providers, threads, files, batch size).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from inference_oracle import PROPERTY, _mask, _scorer, _seen, _tables

from mfbatch.artifact.files import export_model
from mfbatch.errors import ConfigError, ModelError
from mfbatch.serving.lists import ListBatch, to_arrow, with_rating
from mfbatch.serving.session import FAST_CPU_BATCH_MB, Scorer, _gpu_present
from mfbatch.training.model import MatrixFactorization, ModelShape

# --- Properties of the published rows, at the Scorer level -----------------------------------


@st.composite
def _problems(draw: st.DrawFn) -> dict[str, Any]:
    n_users = draw(st.integers(1, 6))
    n_items = draw(st.integers(1, 12))
    return {
        "n_users": n_users,
        "n_items": n_items,
        "dim": draw(st.integers(1, 4)),
        "batch_norm": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "per_user": [
            sorted(draw(st.sets(st.integers(0, n_items - 1), max_size=n_items)))
            for _ in range(n_users)
        ],
        "allowed": draw(st.lists(st.booleans(), min_size=n_items, max_size=n_items)),
        "k": draw(st.integers(1, n_items)),
        "batch": draw(
            st.permutations(range(n_users)).flatmap(
                lambda p: st.integers(1, len(p)).map(lambda n: list(p[:n]))
            )
        ),
        "objective": draw(st.sampled_from(["rating", "ranking"])),
    }


def _random_model(problem: dict[str, Any]) -> MatrixFactorization:
    torch.manual_seed(problem["seed"])
    model = MatrixFactorization(
        ModelShape(
            n_users=problem["n_users"],
            n_items=problem["n_items"],
            dim=problem["dim"],
            dropout=0.1,
            batch_norm=problem["batch_norm"],
        ),
        init_std=1.0,
    )
    with torch.no_grad():
        for table in (model.user_bias.weight, model.item_bias.weight, model.global_bias):
            table.normal_(0.5, 0.3)
    if problem["batch_norm"] and problem["n_users"] > 1 and problem["n_items"] > 1:
        model.train()
        model(
            torch.arange(problem["n_users"]), torch.arange(problem["n_users"]) % problem["n_items"]
        )
    model.eval()
    return model


@PROPERTY
@given(problem=_problems())
def test_published_rows_are_unseen_allowed_ranked_and_complete(
    graphs: Path, problem: dict[str, Any]
) -> None:
    model = _random_model(problem)
    manifest = {
        "run_id": "run-x",
        "dataset_sha256": "0" * 64,
        "data_seen": "train",
        "rating_min": 1.0,
        "rating_max": 5.0,
        "objective": problem["objective"],
    }
    folder = graphs / "property"
    folder.mkdir(exist_ok=True)
    scorer = Scorer(export_model(model, manifest, folder), provider="cpu", threads=1)
    per_user, allowed, k = problem["per_user"], problem["allowed"], problem["k"]
    seen = _seen(per_user)
    mask = _mask(allowed)
    users = np.array(problem["batch"], dtype=np.int64)
    items, scores = scorer.top_k(users, seen, mask, k)
    lists = ListBatch(users, items, scores, np.ones(len(users), dtype=bool))
    # run_id and created_at are constants the publishing query adds (tested in the CLI tests).
    table = with_rating(
        to_arrow(
            lists,
            pa.array([f"user-{u}" for u in range(problem["n_users"])], pa.string()),
            pa.array([f"item-{i}" for i in range(problem["n_items"])], pa.string()),
        ),
        problem["objective"],
        1.0,
        5.0,
    ).to_pylist()
    with torch.no_grad():
        truth = {
            (u, i): float(model(torch.tensor([u]), torch.tensor([i])))
            for u in problem["batch"]
            for i in range(problem["n_items"])
        }
    for user in range(problem["n_users"]):
        rows = [r for r in table if r["user_id"] == f"user-{user}"]
        if user not in problem["batch"]:
            assert rows == []
            continue
        candidates = {i for i in range(problem["n_items"]) if allowed[i]} - set(per_user[user])
        recommended = [int(r["item_id"].removeprefix("item-")) for r in rows]
        assert len(rows) == min(k, len(candidates))
        assert set(recommended) <= candidates  # never seen, never denied
        assert len(set(recommended)) == len(recommended)
        assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
        row_scores = [r["score"] for r in rows]
        assert all(np.isfinite(row_scores))
        assert all(a >= b for a, b in itertools.pairwise(row_scores))
        # The score is the model's prediction, and no better candidate was passed over.
        for item, value in zip(recommended, row_scores, strict=True):
            assert value == pytest.approx(truth[(user, item)], abs=1e-5)
        left_out = candidates - set(recommended)
        if rows and left_out:
            assert max(truth[(user, i)] for i in left_out) <= row_scores[-1] + 1e-5
        for r in rows:
            if problem["objective"] == "rating":
                expected = min(max(r["score"], 0.0), 1.0) * 4.0 + 1.0
                assert r["predicted_rating"] == pytest.approx(expected)
                assert 1.0 <= r["predicted_rating"] <= 5.0
            else:
                assert r["predicted_rating"] is None


# --- Session set-up ---------------------------------------------------------------------------


def test_scorer_reports_the_cpu_provider_and_threads(graphs: Path) -> None:
    users_aug, items_aug_t = _tables(np.random.default_rng(0), 2, 3, 2)
    scorer = _scorer(graphs, users_aug, items_aug_t)
    assert scorer.provider == "cpu (1 thread)"
    assert scorer.warnings == []


def test_unknown_provider_missing_and_corrupt_files(graphs: Path, tmp_path: Path) -> None:
    users_aug, items_aug_t = _tables(np.random.default_rng(0), 2, 3, 2)
    good = _scorer(graphs, users_aug, items_aug_t).path
    with pytest.raises(ConfigError, match="--provider"):
        Scorer(good, provider="tpu")
    with pytest.raises(ModelError, match="does not exist"):
        Scorer(tmp_path / "model.onnx", provider="cpu")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(good.read_bytes()[:100])
    with pytest.raises(ModelError, match="could not be loaded by ONNX Runtime") as info:
        Scorer(corrupt, provider="cpu")
    assert "\n" not in str(info.value).strip()


@pytest.mark.skipif(_gpu_present(), reason="checks the message on a machine without a GPU")
def test_cuda_requested_on_a_cpu_only_machine(graphs: Path) -> None:
    users_aug, items_aug_t = _tables(np.random.default_rng(0), 2, 3, 2)
    good = _scorer(graphs, users_aug, items_aug_t).path
    with pytest.raises(ConfigError, match="--provider cuda") as info:
        Scorer(good, provider="cuda")
    assert "--provider cpu" in str(info.value)
    auto = Scorer(good, provider="auto", threads=2)
    assert auto.provider == "cpu (2 threads)"


@pytest.mark.parametrize(
    ("n_items", "memory_mb", "expected"),
    # The CPU path keeps one float32 score row per user in flight; past FAST_CPU_BATCH_MB
    # of them a bigger batch is slower, so a larger budget does not make the batch larger.
    [
        (100_000, 512, (FAST_CPU_BATCH_MB << 20) // (100_000 * 4)),
        (100_000, 64, (64 << 20) // (100_000 * 4)),
        (10, 512, 16384),
        (10**9, 16, 1),
    ],
)
def test_auto_batch_size(graphs: Path, n_items: int, memory_mb: int, expected: int) -> None:
    users_aug, items_aug_t = _tables(np.random.default_rng(0), 2, 3, 2)
    scorer = Scorer(_scorer(graphs, users_aug, items_aug_t).path, provider="cpu")
    assert scorer.auto_batch_size(n_items, memory_mb) == expected
