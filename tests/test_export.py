"""The exported ONNX graph: valid, self-describing, free of training ops, and equal to torch.

Every check runs the real file that `export_model` writes, through ONNX Runtime.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mfbatch.artifact.files import export_model, read_metadata
from mfbatch.artifact.graph import INPUTS, OPSET, OUTPUTS
from mfbatch.artifact.parts import serving_parts
from mfbatch.errors import ModelError
from mfbatch.training.model import MatrixFactorization, ModelShape

N_USERS, N_ITEMS, DIM = 11, 17, 6


def _manifest(run_id: str = "20240101-000000-abcdef") -> dict[str, Any]:
    return {
        "run_id": run_id,
        "dataset_sha256": "d" * 64,
        "data_seen": "train",
        "rating_min": 0.5,
        "rating_max": 5.0,
        "objective": "rating",
    }


def _trained_model(*, batch_norm: bool, dropout: float, seed: int = 0) -> MatrixFactorization:
    """A model moved away from its initial state by a few real optimiser steps in train mode,
    so embeddings, biases, BatchNorm's affine parameters and running statistics all differ
    from their defaults."""
    torch.manual_seed(seed)
    model = MatrixFactorization(
        ModelShape(
            n_users=N_USERS, n_items=N_ITEMS, dim=DIM, dropout=dropout, batch_norm=batch_norm
        ),
        init_std=0.5,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(25):
        users = torch.randint(0, N_USERS, (32,))
        items = torch.randint(0, N_ITEMS, (32,))
        target = torch.rand(32)
        loss = torch.nn.functional.mse_loss(model(users, items), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model


def _all_scores(path: Path, n_users: int, n_items: int) -> np.ndarray:
    """Every (user, item) score from the graph: k = n_items, nothing seen, nothing masked,
    then each row put back into item order."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    top_scores, top_items = session.run(
        list(OUTPUTS),
        {
            "users": np.arange(n_users, dtype=np.int64),
            "seen": np.zeros((0, 2), dtype=np.int64),
            "item_mask": np.zeros(n_items, dtype=np.float32),
            "k": np.array([n_items], dtype=np.int64),
        },
    )
    assert top_items.shape == (n_users, n_items)
    # Each row is a permutation of the catalogue, sorted best first.
    assert (np.sort(top_items, axis=1) == np.arange(n_items)).all()
    assert (np.diff(top_scores, axis=1) <= 0).all()
    full = np.empty((n_users, n_items), dtype=np.float64)
    np.put_along_axis(full, top_items, top_scores.astype(np.float64), axis=1)
    return full


@pytest.fixture
def bn_model() -> MatrixFactorization:
    return _trained_model(batch_norm=True, dropout=0.2)


def test_written_file_passes_the_checker_and_carries_the_metadata(
    bn_model: MatrixFactorization, tmp_path: Path
) -> None:
    path = export_model(bn_model, _manifest(), tmp_path)
    assert path == tmp_path / "model.onnx"
    assert not (tmp_path / "model.onnx.part").exists()
    onnx.checker.check_model(str(path), full_check=True)

    proto = onnx.load_model(str(path))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    stored = {p.key: json.loads(p.value) for p in proto.metadata_props}
    expected = {
        "run_id": "20240101-000000-abcdef",
        "dataset_sha256": "d" * 64,
        "n_users": N_USERS,
        "n_items": N_ITEMS,
        "rating_min": 0.5,
        "rating_max": 5.0,
        "embedding_dim": DIM,
        "opset": OPSET,
        "data_seen": "train",
        "objective": "rating",
    }
    assert {k: stored.get(k) for k in expected} == expected
    assert read_metadata(path) == stored

    assert [i.name for i in proto.graph.input] == list(INPUTS)
    assert [o.name for o in proto.graph.output] == list(OUTPUTS)


def test_graph_has_no_training_only_nodes_and_folds_the_biases(
    bn_model: MatrixFactorization, tmp_path: Path
) -> None:
    proto = onnx.load_model(str(export_model(bn_model, _manifest(), tmp_path)))
    ops = [node.op_type for node in proto.graph.node]
    assert "Dropout" not in ops
    assert "BatchNormalization" not in ops
    assert ops.count("MatMul") == 1 and ops[-1] == "TopK"
    tables = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    # Biases ride in two extra columns: users [p_u, 1, mu + b_u], items [q_i, b_i, 1].
    assert tables["U_aug"].shape == (N_USERS, DIM + 2)
    assert tables["V_aug_t"].shape == (DIM + 2, N_ITEMS)
    assert (tables["U_aug"][:, DIM] == 1).all()
    assert (tables["V_aug_t"][DIM + 1] == 1).all()
    assert all(t.ndim <= 2 and t.dtype in (np.float32, np.int64) for t in tables.values())


@pytest.mark.parametrize(
    ("batch_norm", "dropout"), [(True, 0.2), (False, 0.0), (False, 0.3), (True, 0.0)]
)
def test_onnx_scores_equal_the_eval_mode_torch_model(
    batch_norm: bool, dropout: float, tmp_path: Path
) -> None:
    model = _trained_model(batch_norm=batch_norm, dropout=dropout, seed=3)
    if batch_norm:
        # The parity must not hold merely because BatchNorm is still the identity.
        user_norm, item_norm = model.user_norm, model.item_norm
        assert isinstance(user_norm, torch.nn.BatchNorm1d)
        assert isinstance(item_norm, torch.nn.BatchNorm1d)
        assert user_norm.running_mean is not None and item_norm.running_var is not None
        assert user_norm.running_mean.abs().max() > 1e-3
        assert (item_norm.running_var - 1).abs().max() > 1e-3
        assert (user_norm.weight - 1).abs().max() > 1e-3
    assert model.global_bias.abs().item() > 1e-3
    assert model.item_bias.weight.abs().max() > 1e-3

    path = export_model(model, _manifest(), tmp_path)
    onnx_scores = _all_scores(path, N_USERS, N_ITEMS)

    users = torch.arange(N_USERS).repeat_interleave(N_ITEMS)
    items = torch.arange(N_ITEMS).repeat(N_USERS)
    with torch.no_grad():
        expected = model(users, items).reshape(N_USERS, N_ITEMS).double().numpy()
        again = model(users, items).reshape(N_USERS, N_ITEMS).double().numpy()
    assert np.array_equal(expected, again)  # eval mode: dropout really is off
    np.testing.assert_allclose(onnx_scores, expected, rtol=0, atol=1e-5)
    # The scores spread wide enough that 1e-5 is a real bound, not the whole range.
    assert expected.max() - expected.min() > 0.1


def test_export_leaves_the_model_in_training_mode_when_it_was(
    bn_model: MatrixFactorization, tmp_path: Path
) -> None:
    bn_model.train()
    export_model(bn_model, _manifest(), tmp_path)
    assert bn_model.training and bn_model.user_norm.training


def test_re_export_replaces_the_file(tmp_path: Path) -> None:
    first = _trained_model(batch_norm=False, dropout=0.0, seed=1)
    second = _trained_model(batch_norm=True, dropout=0.1, seed=2)
    export_model(first, _manifest("run-one"), tmp_path)
    path = export_model(second, _manifest("run-two"), tmp_path)
    assert read_metadata(path)["run_id"] == "run-two"
    users = torch.arange(N_USERS).repeat_interleave(N_ITEMS)
    items = torch.arange(N_ITEMS).repeat(N_USERS)
    with torch.no_grad():
        expected = second(users, items).reshape(N_USERS, N_ITEMS).double().numpy()
    np.testing.assert_allclose(_all_scores(path, N_USERS, N_ITEMS), expected, atol=1e-5)
    # model.onnx and the parts serving reads, cut from it; no `.part` file left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "items_aug_t.npy",
        "model.onnx",
        "scores.onnx",
        "serving.json",
        "topk.onnx",
        "vectors.onnx",
    ]
    parts = serving_parts(path)
    assert parts is not None and parts.metadata["run_id"] == "run-two"
    np.testing.assert_array_equal(parts.item_table(), load_item_table_from_graph(path))


def load_item_table_from_graph(path: Path) -> np.ndarray:
    from mfbatch.artifact.graph import item_table, load_graph

    return item_table(load_graph(path))


def test_unwritable_target_is_a_model_error(bn_model: MatrixFactorization, tmp_path: Path) -> None:
    folder = tmp_path / "not-created"
    with pytest.raises(ModelError, match="could not write") as info:
        export_model(bn_model, _manifest(), folder)
    assert "\n" not in str(info.value)
    assert "mfbatch export" in str(info.value)
    assert not folder.exists()


def test_read_metadata_of_missing_or_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        read_metadata(tmp_path / "model.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff\xfe this is not a protobuf \x00\x01" * 8)
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        read_metadata(garbage)
