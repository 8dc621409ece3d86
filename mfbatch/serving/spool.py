"""The spool: scored lists on their way to the publish, written while the next batch scores.

A score writes its lists into an Arrow IPC file inside an owned scratch folder beside the
database (`mfbatch.store.workdirs`); the publish reads it back in one transaction. A crash
leaves only the folder, which the next score removes.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from mfbatch.serving.lists import ListBatch

SPOOL_PREFIX = ".mfbatch-score-"
SPOOL_FILE = "recommendations.arrow"


def read_spool(path: Path) -> pa.Table:
    """The spooled lists, memory-mapped (no copy until DuckDB reads them)."""
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


class Spooler:
    """Converts each batch's lists to Arrow and appends them to the spool, on its own thread.

    ONNX Runtime releases the GIL while it scores, so the conversion and the file write of
    one batch run while the next batch scores instead of taking turns with it. Batches are
    written in the order they were put. A failure on the thread (disk full, Ctrl-C delivered
    there, a bug) is raised again in the caller, unchanged, by the next put() or close().
    """

    def __init__(self, path: Path, convert: Callable[[ListBatch], pa.Table]) -> None:
        self._path = path
        self._convert = convert
        # Two in flight at most: the one being written and the one just scored; more
        # would only hold lists in memory while the disk is behind.
        self._queue: queue.Queue[ListBatch | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self._rows: int | None = None
        self._thread = threading.Thread(target=self._drain, name="mfbatch-spool", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        writer: pa.ipc.RecordBatchFileWriter | None = None
        rows = 0
        try:
            while (lists := self._queue.get()) is not None and not self._stopping.is_set():
                table = self._convert(lists)
                if writer is None:
                    writer = pa.ipc.new_file(str(self._path), table.schema)
                writer.write_table(table)
                rows += table.num_rows
            if writer is not None:
                writer.close()
                writer = None
                self._rows = rows
        except BaseException as exc:  # re-raised on the caller's thread, whatever it is
            self._error = exc
        finally:
            if writer is not None:
                try:
                    writer.close()
                except BaseException as exc:  # a full disk fails the close too: report once,
                    self._error = self._error or exc  # on the caller's thread, no traceback

    def _check(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def put(self, lists: ListBatch | None) -> None:
        while self._thread.is_alive():
            self._check()
            try:
                self._queue.put(lists, timeout=0.05)
                return
            except queue.Full:
                continue
        self._check()

    def close(self) -> int | None:
        """Waits for every batch to be on disk: the rows spooled, None if there were none."""
        self.put(None)
        self._thread.join()
        self._check()
        return self._rows

    def stop(self) -> None:
        """Ends the thread without writing what is still queued (after a failure)."""
        self._stopping.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join()
