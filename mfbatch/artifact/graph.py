"""A run's ONNX scoring graph and the variants cut from it.

Export writes them as bytes (`model_bytes`, `part_bytes`; mfbatch.artifact.wire), with
neither onnx nor torch imported; the functions on parsed graphs (`build_graph`,
`split_stages`, `vectors_graph`, `load_graph`: tests, and serving an older export) import
onnx when called.

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

from mfbatch.artifact import wire
from mfbatch.errors import ModelError
from mfbatch.version import __version__

if TYPE_CHECKING:  # export needs neither; parsing graphs imports onnx when called
    import onnx

    from mfbatch.training.model import MatrixFactorization

OPSET = 17
# ORT 1.x reads IR version 10 at most; keep the file loadable by a range of runtimes.
IR_VERSION = 9
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


def _users() -> bytes:
    return wire.value_info("users", wire.INT64, ["batch"])


def _rows(width: int) -> bytes:
    return wire.value_info("user_rows", wire.FLOAT, ["batch", width])


def _scores(n_items: int) -> bytes:
    return wire.value_info("scores", wire.FLOAT, ["batch", n_items])


def _k() -> bytes:
    return wire.value_info("k", wire.INT64, [1])


def _top() -> list[bytes]:
    return [
        wire.value_info("top_scores", wire.FLOAT, ["batch", "k"]),
        wire.value_info("top_items", wire.INT64, ["batch", "k"]),
    ]


def _gather() -> bytes:
    return wire.node("Gather", [U_AUG, "users"], ["user_rows"], axis=0)


def _matmul() -> bytes:
    return wire.node("MatMul", ["user_rows", V_AUG_T], ["scores"])


def _topk(scores: str) -> bytes:
    return wire.node("TopK", [scores, "k"], list(OUTPUTS), axis=1, largest=1, sorted=1)


def _whole(tables: list[bytes], n_items: int) -> bytes:
    """The whole graph (the module's docstring); `tables`: U_aug, V_aug_t."""
    nodes = [
        _gather(),
        _matmul(),
        wire.node("Add", ["scores", "item_mask"], ["allowed"]),
        wire.node("Shape", ["seen"], ["seen_shape"]),
        wire.node("Slice", ["seen_shape", "zero", "one"], ["n_seen"]),
        wire.node(
            "ConstantOfShape",
            ["n_seen"],
            ["minus_inf"],
            value=np.array([-np.inf], dtype=np.float32),
        ),
        wire.node("ScatterND", ["allowed", "seen", "minus_inf"], ["masked"]),
        _topk("masked"),
    ]
    inputs = [
        _users(),
        wire.value_info("seen", wire.INT64, ["n_seen", 2]),
        wire.value_info("item_mask", wire.FLOAT, [n_items]),
        _k(),
    ]
    constants = [
        wire.tensor("zero", np.array([0], dtype=np.int64)),
        wire.tensor("one", np.array([1], dtype=np.int64)),
    ]
    return wire.graph(nodes, "mfbatch_topk", inputs, _top(), [*tables, *constants])


def model_bytes(tables: tuple[bytes, bytes], n_items: int, metadata: dict[str, Any]) -> bytes:
    """model.onnx: the whole scoring graph, with the run's metadata (values as JSON).
    `tables`: `wire.tensor(U_AUG, ...)`, `wire.tensor(V_AUG_T, ...)`."""
    return wire.model(
        _whole(list(tables), n_items),
        ir_version=IR_VERSION,
        opset=OPSET,
        producer=("mfbatch", __version__),
        metadata={k: json.dumps(v) for k, v in metadata.items()},
    )


def part_bytes(
    u_table: bytes | None, v_table: bytes, shape: tuple[int, int], ir_version: int
) -> dict[str, bytes]:
    """The halves and the fold-in variant (`split_stages`, `vectors_graph`), keyed
    scores / topk / vectors; `shape`: V_aug_t's (width, n_items). Without `u_table`, the
    vectors variant only."""
    width, n_items = shape
    graphs = {
        "vectors": wire.graph(
            [_matmul()],
            "mfbatch_vectors",
            [_rows(width)],
            [_scores(n_items)],
            [v_table],
        )
    }
    if u_table is not None:
        graphs["scores"] = wire.graph(
            [_gather(), _matmul()], "mfbatch_scores", [_users()], [_scores(n_items)],
            [u_table, v_table],
        )  # fmt: skip
        graphs["topk"] = wire.graph(
            [_topk("scores")], "mfbatch_topk_only", [_scores(n_items), _k()], _top()
        )
    return {
        name: wire.model(body, ir_version=ir_version, opset=OPSET) for name, body in graphs.items()
    }


def build_graph(
    users_aug: np.ndarray, items_aug_t: np.ndarray, metadata: dict[str, Any]
) -> onnx.ModelProto:
    """model.onnx's graph for these tables, parsed (tests, benchmarks)."""
    import onnx

    tables = (wire.tensor(U_AUG, users_aug), wire.tensor(V_AUG_T, items_aug_t))
    return onnx.ModelProto.FromString(model_bytes(tables, items_aug_t.shape[1], metadata))


def load_graph(path: Path) -> onnx.ModelProto:
    """model.onnx parsed, once per file version: checking a run's metadata and opening
    its sessions read the same file, and parsing a big one is not free (~0.1 s at
    100k users x 20k items). Callers must not modify the result."""
    stat = path.stat()
    return _load_graph(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1)
def _load_graph(path: str, mtime_ns: int, size: int) -> onnx.ModelProto:
    import onnx

    return onnx.load_model(path, load_external_data=False)


def item_table(proto: onnx.ModelProto) -> np.ndarray:
    """The graph's frozen item table V_aug_t [d+2, n_items]: what fold-in solves against."""
    from onnx import numpy_helper

    return next(numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == V_AUG_T)


def check_finite(proto: onnx.ModelProto, path: Path) -> None:
    """A model whose tables hold NaN or inf would publish nonsense lists: refuse it."""
    from onnx import numpy_helper

    for table in proto.graph.initializer:
        values = numpy_helper.to_array(table)
        if values.dtype.kind == "f" and not bool(np.isfinite(values).all()):
            bad = int((~np.isfinite(values)).sum())
            raise ModelError(
                f"{path}: table {table.name} holds {bad:,} NaN/inf value(s); the run is "
                "broken, train again (lower --lr or raise --l2)"
            )


def _tables(proto: onnx.ModelProto) -> dict[str, Any]:
    return {t.name: t for t in proto.graph.initializer}


def vectors_graph(proto: onnx.ModelProto, *, whole: bool) -> onnx.ModelProto:
    """model.onnx with user rows as the input instead of user indices: same V_aug_t.

    A folded-in user (solved at serving time, `mfbatch.serving.foldin`) is a row [p_u, 1, c] in
    U_aug's layout, so from the MatMul on it is scored exactly as a trained user. `whole`:
    the masking and TopK too (the CUDA path); else the scores half only (the CPU path masks
    in place and runs the TopK half `split_stages` makes).
    """
    import onnx

    tables = _tables(proto)
    width, n_items = (int(d) for d in tables[V_AUG_T].dims)
    if not whole:
        parts = part_bytes(
            None, tables[V_AUG_T].SerializeToString(), (width, n_items), proto.ir_version
        )
        return onnx.ModelProto.FromString(parts["vectors"])
    # This model.onnx's own nodes and inputs, less the Gather: an older export's too.
    body = wire.graph(
        [n.SerializeToString() for n in proto.graph.node if n.op_type != "Gather"],
        "mfbatch_vectors",
        [_rows(width), *(i.SerializeToString() for i in proto.graph.input if i.name != "users")],
        [o.SerializeToString() for o in proto.graph.output],
        [t.SerializeToString() for t in proto.graph.initializer if t.name != U_AUG],
    )
    return onnx.ModelProto.FromString(wire.model(body, ir_version=proto.ir_version, opset=OPSET))


def split_stages(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """model.onnx cut at the masking step: (scores graph, TopK graph), same tables.

    On the CPU, ScatterND copies the whole [B, I] score matrix to write a few hundred
    -inf per row, and the item-mask Add is another full pass; masking the matrix in place
    between the two halves does the same work without either (README, "The inference
    core", has the measurement).
    """
    import onnx

    tables = _tables(proto)
    shape = tuple(int(d) for d in tables[V_AUG_T].dims)
    parts = part_bytes(
        tables[U_AUG].SerializeToString(),
        tables[V_AUG_T].SerializeToString(),
        (shape[0], shape[1]),
        proto.ir_version,
    )
    return onnx.ModelProto.FromString(parts["scores"]), onnx.ModelProto.FromString(parts["topk"])
