"""What serving reads from a run's folder, prepared at export so serving never imports onnx.

`export` writes, beside model.onnx and from the same tables (as bytes, mfbatch.artifact.wire:
export imports no onnx either):

- scores.onnx   users -> scores [B, I]: Gather + MatMul (the CPU path's first half)
- topk.onnx     scores, k -> top_scores, top_items (the second half)
- vectors.onnx  user_rows -> scores: the fold-in variant of the first half
- items_aug_t.npy  the frozen item table V_aug_t [d+2, I] fold-in solves against
- serving.json  model.onnx's metadata, whether every table was finite, and model.onnx's
                size and mtime: written last, so it marks the parts complete and of this
                model.onnx (one replaced since, by hand or by an older version, is read
                as an older export is)

Parsing model.onnx and cutting it with the onnx package cost ~0.85 s of every
`mfbatch score` start-up (the import alone); ONNX Runtime reads these files directly.
A folder exported by an older version holds model.onnx only: `serving_parts` returns None
and the caller builds the same graphs in memory from model.onnx (onnx imported then).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SCORES_FILE = "scores.onnx"
TOPK_FILE = "topk.onnx"
VECTORS_FILE = "vectors.onnx"
ITEMS_FILE = "items_aug_t.npy"
SERVING_FILE = "serving.json"


@dataclass(frozen=True)
class ServingParts:
    folder: Path
    metadata: dict[str, Any]
    non_finite: dict[str, int]  # table name -> NaN/inf values (0 when finite)

    @property
    def scores(self) -> Path:
        return self.folder / SCORES_FILE

    @property
    def topk(self) -> Path:
        return self.folder / TOPK_FILE

    @property
    def vectors(self) -> Path:
        return self.folder / VECTORS_FILE

    def item_table(self) -> np.ndarray:
        return np.load(self.folder / ITEMS_FILE)


def serving_parts(model_path: Path) -> ServingParts | None:
    """The parts export wrote beside `model_path`, or None for an older export."""
    folder = model_path.parent
    names = (SCORES_FILE, TOPK_FILE, VECTORS_FILE, ITEMS_FILE, SERVING_FILE)
    if not model_path.is_file() or not all((folder / n).is_file() for n in names):
        return None
    try:
        stored = json.loads((folder / SERVING_FILE).read_text(encoding="utf-8"))
        stat = model_path.stat()
        if stored["model"] != [stat.st_size, stat.st_mtime_ns]:
            return None
        return ServingParts(folder, dict(stored["metadata"]), dict(stored["non_finite"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable: served from model.onnx as an older export is


def load_item_table(model_path: Path) -> np.ndarray:
    """V_aug_t [d+2, I] of a run: export's .npy, or from an older export's model.onnx."""
    parts = serving_parts(model_path)
    if parts is not None:
        return parts.item_table()
    from mfbatch.artifact.graph import item_table, load_graph

    return item_table(load_graph(model_path))


def write_parts(tables: tuple[bytes, bytes], items_aug_t: np.ndarray, folder: Path) -> list[Path]:
    """The graphs (`tables`: U_aug and V_aug_t as `wire.tensor` bytes) and the item
    table, each written to a `.part` file, for the caller to rename into place before
    model.onnx."""
    from mfbatch.artifact.graph import IR_VERSION, part_bytes

    graphs = part_bytes(tables[0], tables[1], items_aug_t.shape, IR_VERSION)
    written: list[Path] = []
    for name, key in ((SCORES_FILE, "scores"), (TOPK_FILE, "topk"), (VECTORS_FILE, "vectors")):
        partial = folder / (name + ".part")
        partial.write_bytes(graphs[key])
        written.append(partial)
    partial = folder / (ITEMS_FILE + ".part")
    with partial.open("wb") as out:
        np.save(out, items_aug_t)
    written.append(partial)
    return written


def mark_complete(metadata: dict[str, Any], non_finite: dict[str, int], model_path: Path) -> None:
    """serving.json, once model.onnx is in place: the parts are this model.onnx's."""
    stat = model_path.stat()
    stored = {
        "metadata": metadata,
        "non_finite": non_finite,
        "model": [stat.st_size, stat.st_mtime_ns],
    }
    partial = model_path.parent / (SERVING_FILE + ".part")
    partial.write_text(json.dumps(stored), encoding="utf-8")
    partial.replace(model_path.parent / SERVING_FILE)


def remove_parts(folder: Path) -> None:
    """An export that failed, or model.onnx replaced without them: no stale parts left."""
    for name in (SCORES_FILE, TOPK_FILE, VECTORS_FILE, ITEMS_FILE, SERVING_FILE):
        (folder / name).unlink(missing_ok=True)
        (folder / (name + ".part")).unlink(missing_ok=True)
