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
from mfbatch.artifact.graph import (
    INPUTS,
    OPSET,
    OUTPUTS,
    augmented_tables,
    split_stages,
    vectors_graph,
)
from mfbatch.artifact.parts import serving_parts
from mfbatch.errors import ModelError
from mfbatch.training.model import MatrixFactorization, ModelShape
from mfbatch.version import __version__

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


def _helper_graphs(users_aug: np.ndarray, items_t: np.ndarray, meta: dict[str, Any]) -> Any:
    """The oracle: model.onnx and its parts built with onnx.helper / numpy_helper, the
    way export built them before it wrote the bytes itself (mfbatch.artifact.wire)."""
    from onnx import TensorProto, helper, numpy_helper

    width, n_items = items_t.shape
    info = helper.make_tensor_value_info
    users = info("users", TensorProto.INT64, ["batch"])
    scores = info("scores", TensorProto.FLOAT, ["batch", n_items])
    k = info("k", TensorProto.INT64, [1])
    top = [
        info("top_scores", TensorProto.FLOAT, ["batch", "k"]),
        info("top_items", TensorProto.INT64, ["batch", "k"]),
    ]
    u_t, v_t = (
        numpy_helper.from_array(users_aug, "U_aug"),
        numpy_helper.from_array(items_t, "V_aug_t"),
    )
    gather = helper.make_node("Gather", ["U_aug", "users"], ["user_rows"], axis=0)
    matmul = helper.make_node("MatMul", ["user_rows", "V_aug_t"], ["scores"])

    def topk(source: str) -> Any:
        return helper.make_node("TopK", [source, "k"], list(OUTPUTS), axis=1, largest=1, sorted=1)

    minus_inf = numpy_helper.from_array(np.array([-np.inf], dtype=np.float32))
    whole = helper.make_graph(
        [
            gather,
            matmul,
            helper.make_node("Add", ["scores", "item_mask"], ["allowed"]),
            helper.make_node("Shape", ["seen"], ["seen_shape"]),
            helper.make_node("Slice", ["seen_shape", "zero", "one"], ["n_seen"]),
            helper.make_node("ConstantOfShape", ["n_seen"], ["minus_inf"], value=minus_inf),
            helper.make_node("ScatterND", ["allowed", "seen", "minus_inf"], ["masked"]),
            topk("masked"),
        ],
        "mfbatch_topk",
        [
            users,
            info("seen", TensorProto.INT64, ["n_seen", 2]),
            info("item_mask", TensorProto.FLOAT, [n_items]),
            k,
        ],
        top,
        initializer=[
            u_t,
            v_t,
            numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
        ],
    )
    parts = {
        "scores.onnx": helper.make_graph(
            [gather, matmul], "mfbatch_scores", [users], [scores], [u_t, v_t]
        ),
        "topk.onnx": helper.make_graph([topk("scores")], "mfbatch_topk_only", [scores, k], top),
        "vectors.onnx": helper.make_graph(
            [matmul],
            "mfbatch_vectors",
            [info("user_rows", TensorProto.FLOAT, ["batch", width])],
            [scores],
            [v_t],
        ),
    }
    models = {}
    opset = [helper.make_opsetid("", OPSET)]
    for name, graph in {"model.onnx": whole, **parts}.items():
        models[name] = helper.make_model(graph, opset_imports=opset)
        models[name].ir_version = 9
    whole_model = models["model.onnx"]
    whole_model.producer_name, whole_model.producer_version = "mfbatch", __version__
    helper.set_model_props(whole_model, {key: json.dumps(v) for key, v in meta.items()})
    return models


def test_export_writes_the_bytes_onnx_helper_writes(
    bn_model: MatrixFactorization, tmp_path: Path
) -> None:
    """Export writes the graphs as protobuf bytes itself (no onnx import): the files are
    byte for byte what onnx.helper builds for the same graphs, and every one passes the
    full checker."""
    path = export_model(bn_model, _manifest(), tmp_path)
    users_aug, items_t = augmented_tables(bn_model)
    models = _helper_graphs(users_aug, items_t, read_metadata(path))
    for name, expected in models.items():
        onnx.checker.check_model(expected, full_check=True)
        assert (tmp_path / name).read_bytes() == expected.SerializeToString(), name
    # The cuts serving makes of an older export's model.onnx: the same bytes again.
    scores, topk = split_stages(onnx.load_model(str(path)))
    vectors = vectors_graph(onnx.load_model(str(path)), whole=False)
    for name, cut in (("scores.onnx", scores), ("topk.onnx", topk), ("vectors.onnx", vectors)):
        assert cut.SerializeToString() == models[name].SerializeToString(), name
    onnx.checker.check_model(vectors_graph(onnx.load_model(str(path)), whole=True), full_check=True)
