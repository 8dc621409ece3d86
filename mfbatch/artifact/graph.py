"""Model artifacts: the state dict + manifest of a run, and its compiled ONNX scoring graph.

torch is imported inside the functions that need it, so scoring (which reads only the
graph) never loads it.

The compiled inference core is the trained model as one ONNX scoring graph.

Not a trace of the training module: dropout is gone, BatchNorm is folded into the tables,
and the biases ride in two extra columns, so a single MatMul yields the full prediction:

    U_aug[u] = [p_u, 1, mu + b_u]      V_aug[i] = [q_i, b_i, 1]
    U_aug[u] . V_aug[i] = p_u.q_i + b_i + mu + b_u = r_hat(u, i)

The graph then masks what must not be recommended and takes the top K:

    users[B] --Gather(U_aug)--> [B, d+2] --MatMul(V_aug^T)--> scores[B, I]
    scores + item_mask[I]                  (allow/deny lists: 0 or -inf per item)
    ScatterND(-inf at seen[S, 2])          (the (batch row, item) pairs a user rated)
    TopK(k) --> top_scores[B, K], top_items[B, K]
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mfbatch.errors import ModelError
from mfbatch.version import __version__

if TYPE_CHECKING:  # scoring reads the graph without torch; only export needs the module
    from mfbatch.training.model import MatrixFactorization

OPSET = 17
INPUTS = ("users", "seen", "item_mask", "k")
OUTPUTS = ("top_scores", "top_items")
# The two tables every variant of the graph shares.
U_AUG = "U_aug"
V_AUG_T = "V_aug_t"


def augmented_tables(model: MatrixFactorization) -> tuple[np.ndarray, np.ndarray]:
    """(U_aug [n_users, d+2], V_aug^T [d+2, n_items]) as float32, from the eval-mode model."""
    tables = model.folded()
    p, q, b_u, b_i = (t.detach().cpu().double().numpy() for t in tables[:4])
    mu = tables[4]
    users = np.concatenate([p, np.ones((len(p), 1)), (mu + b_u)[:, None]], axis=1)
    items = np.concatenate([q, b_i[:, None], np.ones((len(q), 1))], axis=1)
    # V is stored transposed so the MatMul reads it without a Transpose node.
    return users.astype(np.float32), np.ascontiguousarray(items.T.astype(np.float32))


def build_graph(
    users_aug: np.ndarray, items_aug_t: np.ndarray, metadata: dict[str, Any]
) -> onnx.ModelProto:
    n_items = items_aug_t.shape[1]
    nodes = [
        helper.make_node("Gather", [U_AUG, "users"], ["user_rows"], axis=0),
        helper.make_node("MatMul", ["user_rows", V_AUG_T], ["scores"]),
        helper.make_node("Add", ["scores", "item_mask"], ["allowed"]),
        helper.make_node("Shape", ["seen"], ["seen_shape"]),
        helper.make_node("Slice", ["seen_shape", "zero", "one"], ["n_seen"]),
        helper.make_node(
            "ConstantOfShape",
            ["n_seen"],
            ["minus_inf"],
            value=numpy_helper.from_array(np.array([-np.inf], dtype=np.float32)),
        ),
        helper.make_node("ScatterND", ["allowed", "seen", "minus_inf"], ["masked"]),
        helper.make_node(
            "TopK", ["masked", "k"], ["top_scores", "top_items"], axis=1, largest=1, sorted=1
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "mfbatch_topk",
        inputs=[
            helper.make_tensor_value_info("users", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("seen", TensorProto.INT64, ["n_seen", 2]),
            helper.make_tensor_value_info("item_mask", TensorProto.FLOAT, [n_items]),
            helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
        ],
        outputs=[
            helper.make_tensor_value_info("top_scores", TensorProto.FLOAT, ["batch", "k"]),
            helper.make_tensor_value_info("top_items", TensorProto.INT64, ["batch", "k"]),
        ],
        initializer=[
            numpy_helper.from_array(users_aug, U_AUG),
            numpy_helper.from_array(items_aug_t, V_AUG_T),
            numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "one"),
        ],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="mfbatch",
        producer_version=__version__,
    )
    # ORT 1.x reads IR version 10 at most; keep the file loadable by a range of runtimes.
    model.ir_version = min(model.ir_version, 9)
    helper.set_model_props(model, {k: json.dumps(v) for k, v in metadata.items()})
    onnx.checker.check_model(model, full_check=True)
    return model


def load_graph(path: Path) -> onnx.ModelProto:
    """model.onnx parsed, once per file version: checking a run's metadata and opening
    its sessions read the same file, and parsing a big one is not free (~0.1 s at
    100k users x 20k items). Callers must not modify the result."""
    stat = path.stat()
    return _load_graph(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1)
def _load_graph(path: str, mtime_ns: int, size: int) -> onnx.ModelProto:
    return onnx.load_model(path, load_external_data=False)


def item_table(proto: onnx.ModelProto) -> np.ndarray:
    """The graph's frozen item table V_aug_t [d+2, n_items]: what fold-in solves against."""
    return next(numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == V_AUG_T)


def check_finite(proto: onnx.ModelProto, path: Path) -> None:
    """A model whose tables hold NaN or inf would publish nonsense lists: refuse it."""
    for table in proto.graph.initializer:
        values = numpy_helper.to_array(table)
        if values.dtype.kind == "f" and not bool(np.isfinite(values).all()):
            bad = int((~np.isfinite(values)).sum())
            raise ModelError(
                f"{path}: table {table.name} holds {bad:,} NaN/inf value(s); the run is "
                "broken, train again (lower --lr or raise --l2)"
            )


def vectors_graph(proto: onnx.ModelProto, *, whole: bool) -> onnx.ModelProto:
    """model.onnx with user rows as the input instead of user indices: same V_aug_t.

    A folded-in user (solved at serving time, `mfbatch.serving.foldin`) is a row [p_u, 1, c] in
    U_aug's layout, so from the MatMul on it is scored exactly as a trained user. `whole`:
    the masking and TopK too (the CUDA path); else the scores half only (the CPU path masks
    in place and runs the TopK half `split_stages` makes).
    """
    tables = {t.name: t for t in proto.graph.initializer}
    v_aug_t = numpy_helper.to_array(tables[V_AUG_T])
    width, n_items = v_aug_t.shape
    rows = helper.make_tensor_value_info("user_rows", TensorProto.FLOAT, ["batch", width])
    if whole:
        nodes = [n for n in proto.graph.node if n.op_type != "Gather"]
        inputs = [rows, *(i for i in proto.graph.input if i.name != "users")]
        outputs = list(proto.graph.output)
        kept = [t for t in proto.graph.initializer if t.name != U_AUG]
    else:
        nodes = [helper.make_node("MatMul", ["user_rows", V_AUG_T], ["scores"])]
        inputs = [rows]
        outputs = [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", n_items])]
        kept = [tables[V_AUG_T]]
    graph = helper.make_graph(nodes, "mfbatch_vectors", inputs, outputs, initializer=kept)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = proto.ir_version
    return model


def split_stages(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """model.onnx cut at the masking step: (scores graph, TopK graph), same tables.

    On the CPU, ScatterND copies the whole [B, I] score matrix to write a few hundred
    -inf per row, and the item-mask Add is another full pass; masking the matrix in place
    between the two halves does the same work without either (README, "The inference
    core", has the measurement).
    """
    tables = {t.name: t for t in proto.graph.initializer}
    n_items = numpy_helper.to_array(tables[V_AUG_T]).shape[1]
    scores = helper.make_graph(
        [
            helper.make_node("Gather", [U_AUG, "users"], ["user_rows"], axis=0),
            helper.make_node("MatMul", ["user_rows", V_AUG_T], ["scores"]),
        ],
        "mfbatch_scores",
        inputs=[helper.make_tensor_value_info("users", TensorProto.INT64, ["batch"])],
        outputs=[helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", n_items])],
        initializer=[tables[U_AUG], tables[V_AUG_T]],
    )
    topk = helper.make_graph(
        [helper.make_node("TopK", ["scores", "k"], list(OUTPUTS), axis=1, largest=1, sorted=1)],
        "mfbatch_topk_only",
        inputs=[
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", n_items]),
            helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
        ],
        outputs=[
            helper.make_tensor_value_info("top_scores", TensorProto.FLOAT, ["batch", "k"]),
            helper.make_tensor_value_info("top_items", TensorProto.INT64, ["batch", "k"]),
        ],
    )
    models = []
    for graph in (scores, topk):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = proto.ir_version
        models.append(model)
    return models[0], models[1]
