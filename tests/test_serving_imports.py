"""Serving imports only what it runs: no onnx, torch or polars on the `score` path.

The graph surgery serving needs is done at export (mfbatch.artifact.parts); a run
exported before that is still served, from model.onnx (onnx imported then).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import Workspace, rows

from mfbatch.artifact.parts import SERVING_FILE

SCRIPT = """
import json, sys
from mfbatch.config import load_config
from mfbatch.stages.score import score
summary = score(config=load_config(db=sys.argv[1], overrides={"score": {"threads": 1,
    "provider": "cpu", "top_k": 5}}))
print(json.dumps({"rows": summary.rows,
                  "loaded": sorted(m for m in ("onnx", "torch", "polars") if m in sys.modules)}))
"""


def _score_in_subprocess(db: Path) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(db)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_scoring_a_run_imports_neither_onnx_nor_torch_nor_polars(ws: Workspace) -> None:
    result = _score_in_subprocess(ws.db)
    assert result["loaded"] == []
    assert result["rows"] == rows(ws.db, "SELECT count(*) FROM recommendations")[0][0] > 0


def test_an_older_export_is_served_the_same_from_model_onnx(ws: Workspace) -> None:
    assert ws.score("--top-k", "5").exit_code == 0
    lists = rows(ws.db, "SELECT user_id, item_id, rank, score FROM recommendations ORDER BY 1, 3")
    for marker in (ws.root / "export").glob(f"*/{SERVING_FILE}"):
        marker.unlink()  # model.onnx alone, as an older version exported it
    result = _score_in_subprocess(ws.db)
    assert result["loaded"] == ["onnx"]
    again = rows(ws.db, "SELECT user_id, item_id, rank, score FROM recommendations ORDER BY 1, 3")
    assert again == lists
