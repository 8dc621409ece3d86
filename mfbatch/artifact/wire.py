"""ONNX messages written as protobuf bytes, without the onnx package.

`import onnx` costs ~0.9 s (almost all of it ml_dtypes, which it loads for its type
tables): a tenth of a default ML-100K `mfbatch train`, spent to write four small graphs.
Export writes them with these few encoders instead; mfbatch.artifact.graph says what the
graphs are. The bytes are what onnx.helper / numpy_helper and `SerializeToString` give for
the same calls (tests/test_export.py builds each graph both ways and compares them), so a
reader sees the files it always saw.

Field numbers are onnx.proto's (onnx/onnx.proto3 in the onnx sources). Fields are written
in field-number order, as protobuf's own serializer does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

# TensorProto.DataType and AttributeProto.AttributeType values.
FLOAT, INT64 = 1, 7
_DTYPES = {np.dtype(np.float32): FLOAT, np.dtype(np.int64): INT64}
_ATTR_INT, _ATTR_TENSOR = 2, 4
_VARINT, _LEN = 0, 2


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64s as protobuf writes them: ten bytes
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3 | _VARINT) + _varint(value)


def _len(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | _LEN) + _varint(len(payload)) + payload


def _str(field: int, text: str) -> bytes:
    return _len(field, text.encode("utf-8"))


def tensor(name: str | None, array: np.ndarray) -> bytes:
    """TensorProto: dims (1), data_type (2), name (8, unless None), raw_data (9,
    little-endian)."""
    dtype = np.dtype(array.dtype)
    if dtype not in _DTYPES:
        raise TypeError(f"tensor {name}: no ONNX type for {dtype}")
    data = np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes()
    dims = b"".join(_int(1, d) for d in array.shape)
    named = b"" if name is None else _str(8, name)
    return b"".join((dims, _int(2, _DTYPES[dtype]), named, _len(9, data)))


def node(op_type: str, inputs: Sequence[str], outputs: Sequence[str], **attrs: object) -> bytes:
    """NodeProto: input (1), output (2), op_type (4), attribute (5) sorted by name, as
    onnx.helper.make_node orders them. Attributes are ints or (name, array) tensors."""
    out = b"".join(_str(1, i) for i in inputs) + b"".join(_str(2, o) for o in outputs)
    out += _str(4, op_type)
    for key, value in sorted(attrs.items()):
        if isinstance(value, np.ndarray):
            # AttributeProto: name (1), t (5), type (20).
            attr = _str(1, key) + _len(5, tensor(None, value)) + _int(20, _ATTR_TENSOR)
        elif isinstance(value, int):
            attr = _str(1, key) + _int(3, value) + _int(20, _ATTR_INT)  # name, i, type
        else:
            raise TypeError(f"attribute {key}: ints and arrays only")
        out += _len(5, attr)
    return out


def value_info(name: str, elem_type: int, shape: Iterable[int | str]) -> bytes:
    """ValueInfoProto (name 1, type 2) of a tensor; int dims fixed, str dims named."""
    dims = b"".join(
        _len(1, _str(2, d) if isinstance(d, str) else _int(1, d))  # dim_param 2, dim_value 1
        for d in shape
    )
    tensor_type = _int(1, elem_type) + _len(2, dims)  # elem_type 1, shape 2
    return _str(1, name) + _len(2, _len(1, tensor_type))  # TypeProto.tensor_type 1


def graph(
    nodes: Sequence[bytes],
    name: str,
    inputs: Sequence[bytes],
    outputs: Sequence[bytes],
    initializers: Sequence[bytes] = (),
) -> bytes:
    """GraphProto: node (1), name (2), initializer (5), input (11), output (12); the
    initializers are `tensor(...)` bytes (or an existing TensorProto's serialization)."""
    return (
        b"".join(_len(1, n) for n in nodes)
        + _str(2, name)
        + b"".join(_len(5, t) for t in initializers)
        + b"".join(_len(11, i) for i in inputs)
        + b"".join(_len(12, o) for o in outputs)
    )


def model(
    graph_bytes: bytes,
    *,
    ir_version: int,
    opset: int,
    producer: tuple[str, str] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """ModelProto: ir_version (1), producer_name (2) and _version (3), graph (7),
    opset_import (8: domain 1, here the default "", and version 2), metadata_props (14)."""
    out = _int(1, ir_version)
    if producer is not None:
        out += _str(2, producer[0]) + _str(3, producer[1])
    out += _len(7, graph_bytes) + _len(8, _str(1, "") + _int(2, opset))
    for key, value in (metadata or {}).items():
        out += _len(14, _str(1, key) + _str(2, value))
    return out
