"""Running the exported graph: the ONNX Runtime session and the per-batch inputs.

Kept apart from the scoring stage so tests and benchmarks drive exactly the code
`mfbatch score` runs, without a database.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from mfbatch.artifact.parts import ServingParts, serving_parts
from mfbatch.cores import machine_cores
from mfbatch.errors import ConfigError, ModelError, first_line
from mfbatch.serving.csr import SeenItems

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# What a queued batch gives back when collected: (items [B, k], scores [B, k]).
Pending = Callable[[], tuple[np.ndarray, np.ndarray]]
# Score rows per CPU batch that the speed-first batch size aims at (auto_batch_size).
FAST_CPU_BATCH_MB = 128


def _refuse_non_finite(parts: ServingParts, path: Path) -> None:
    """A model whose tables hold NaN or inf would publish nonsense lists: refuse it."""
    for name, bad in parts.non_finite.items():
        if bad:
            raise ModelError(
                f"{path}: table {name} holds {bad:,} NaN/inf value(s); the run is "
                "broken, train again (lower --lr or raise --l2)"
            )


def _gpu_present() -> bool:
    # onnxruntime-gpu lists the CUDA provider even on machines without a GPU; only try it
    # when the NVIDIA driver is there, so CPU machines don't pay for (and log) a failed load.
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


def _aligned_buffer(rows: int, cols: int) -> np.ndarray:
    """A float32 [rows, cols] buffer starting on a 64-byte boundary, its pages touched.

    ORT's MatMul writes its output with full-width vector stores; numpy's large arrays
    start 16 bytes past a page, and writing scores there measured 24.6 against 20.8 ms a
    batch (1,677 users x 20,000 items, one thread): the floor's own outputs are aligned.
    Touched here, sequentially: the MatMul's first write faulting the pages in made the
    first batch of a score 0.16-0.20 s against 0.07-0.08 s (the fill costs ~0.01 s).
    """
    raw = np.empty(rows * cols + 16, dtype=np.float32)
    raw.fill(0.0)
    start = (-raw.ctypes.data % 64) // 4
    return raw[start : start + rows * cols].reshape(rows, cols)


@dataclass
class Scorer:
    """An ONNX Runtime session over model.onnx, on CUDA when asked/available, else CPU."""

    path: Path
    provider: str = "auto"
    threads: int | None = None
    # "auto": the whole graph on CUDA, the split graph on the CPU. "whole" runs model.onnx
    # as exported on the CPU too, so tests hold every path to the same oracle.
    graph: str = "auto"
    warnings: list[str] = field(default_factory=list)
    on_cuda: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if not self.path.is_file():
            raise ModelError(f"{self.path} does not exist; run `mfbatch export` for that run")
        if self.provider not in ("auto", "cuda", "cpu"):
            raise ConfigError(f"--provider: {self.provider!r} is not one of auto, cuda, cpu")
        if self.graph not in ("auto", "split", "whole"):
            raise ConfigError(f"graph: {self.graph!r} is not one of auto, split, whole")
        # What export prepared beside model.onnx (no onnx import); an older export's
        # model.onnx is parsed and cut in memory instead.
        self._parts = serving_parts(self.path)
        self._proto: Any = None
        if self._parts is not None:
            _refuse_non_finite(self._parts, self.path)
            items = self._parts.item_table()
        else:
            from mfbatch.artifact.graph import check_finite, item_table

            check_finite(self._graph(), self.path)
            items = item_table(self._graph())
        # The model's frozen item tables: what fold-in solves user vectors against, and
        # the catalogue it can score (a database grown since has more items than that).
        self.items_aug_t = items
        self.n_items = int(self.items_aug_t.shape[1])
        self._options = options = ort.SessionOptions()
        self._vectors: ort.InferenceSession | None = None
        available = ort.get_available_providers()
        want_cuda = self.provider == "cuda" or (
            self.provider == "auto" and CUDA in available and _gpu_present()
        )
        if self.provider == "cuda" and (CUDA not in available or not _gpu_present()):
            raise ConfigError(
                "--provider cuda: no CUDA device/provider here "
                f"(onnxruntime {ort.__version__} offers {', '.join(available)}); use --provider cpu"
            )
        options.intra_op_num_threads = self.threads or machine_cores()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # Two sessions share the cores on the CPU path; idle pool threads that spin would
        # steal them from the session that is working.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # On CUDA the whole graph stays on the device. On the CPU it runs in two halves with
        # the masking done in place between them (no [B, I] copy), and the whole graph is
        # never loaded: one copy of the tables, one parse.
        self.session: ort.InferenceSession | None = None
        self._split: tuple[ort.InferenceSession, ort.InferenceSession] | None = None
        self._buffers: dict[int, np.ndarray] = {}  # per scoring thread
        self._workers = options.intra_op_num_threads
        self._pool: ThreadPoolExecutor | None = None
        if want_cuda:
            self.session = self._cuda_session(options)
        if self.session is None and self.graph == "whole":
            try:
                self.session = ort.InferenceSession(str(self.path), options, providers=[CPU])
            except Exception as exc:  # ORT raises its own exception types for bad files
                raise ModelError(
                    f"{self.path} could not be loaded by ONNX Runtime ({first_line(exc)})"
                ) from None
        if self.session is None:
            # One thread per session: each of `threads` workers runs its own slice of the
            # batch through both halves. Split in ORT's intra-op pool instead, only the MatMul
            # and TopK ran in parallel and the masking between them left a core idle: at 2
            # threads that was 1.25x one thread, against ~2x for the slices.
            self._options = options = self._single_thread(options)
            try:
                self._split = self._split_sessions(options)
            except Exception as exc:  # onnx/ORT raise their own types for bad files
                raise ModelError(
                    f"{self.path} could not be loaded by ONNX Runtime ({first_line(exc)})"
                ) from None
        on_cuda = self.session is not None and CUDA in self.session.get_providers()
        self.on_cuda = on_cuda
        n = self._workers
        self.provider = "cuda" if on_cuda else f"cpu ({n} thread{'' if n == 1 else 's'})"

    @staticmethod
    def _single_thread(options: ort.SessionOptions) -> ort.SessionOptions:
        single = ort.SessionOptions()
        single.intra_op_num_threads = 1
        single.inter_op_num_threads = 1
        single.graph_optimization_level = options.graph_optimization_level
        single.log_severity_level = options.log_severity_level
        return single

    def _graph(self) -> Any:
        """model.onnx parsed (an older export, or a variant export did not prepare)."""
        if self._proto is None:
            from mfbatch.artifact.graph import load_graph

            try:
                self._proto = load_graph(self.path)
            except Exception as exc:  # onnx raises assorted protobuf/IO errors
                raise ModelError(
                    f"{self.path} could not be loaded by ONNX Runtime ({first_line(exc)})"
                ) from None
        return self._proto

    def _split_sessions(
        self, options: ort.SessionOptions
    ) -> tuple[ort.InferenceSession, ort.InferenceSession]:
        """The CPU path's two halves: export's files, or cut from model.onnx here."""
        if self._parts is not None:
            halves: list[Any] = [str(self._parts.scores), str(self._parts.topk)]
        else:
            from mfbatch.artifact.graph import split_stages

            halves = [g.SerializeToString() for g in split_stages(self._graph())]
        return (
            ort.InferenceSession(halves[0], options, providers=[CPU]),
            ort.InferenceSession(halves[1], options, providers=[CPU]),
        )

    def _cuda_session(self, options: ort.SessionOptions) -> ort.InferenceSession | None:
        """The whole graph on CUDA, or None (with a warning) when `auto` must fall back."""
        try:
            session = ort.InferenceSession(str(self.path), options, providers=[CUDA, CPU])
        except Exception as exc:  # ORT raises its own exception types for bad files
            if self.provider == "cuda":
                raise ModelError(
                    f"{self.path} could not be loaded by ONNX Runtime ({first_line(exc)})"
                ) from None
            self.warnings.append(f"CUDA provider failed to load ({first_line(exc)}); using the CPU")
            return None
        if CUDA in session.get_providers():
            return session
        if self.provider == "cuda":
            raise ConfigError(
                "--provider cuda: the CUDA provider failed to load; use --provider cpu"
            )
        self.warnings.append("CUDA provider failed to load; using the CPU")
        return None

    def auto_batch_size(self, n_items: int, memory_mb: int) -> int:
        """Users per batch: the fastest size on this device that fits in `memory_mb`."""
        # The CPU path holds one [B, I] buffer, masked in place; the whole-graph path
        # also holds ScatterND's copy and TopK's input.
        per_user = n_items * 4 * (1 if self._split is not None else 3)
        budget = memory_mb << 20
        if not self.on_cuda:
            # Bigger is not faster on the CPU: past ~100-200 MB of scores per batch the
            # MatMul and TopK stream the matrix through memory with nothing left to
            # amortise (bench_score.py measures the floor at each size).
            budget = min(budget, FAST_CPU_BATCH_MB << 20)
        return int(np.clip(budget // per_user, 1, 16384))

    def _buffer(self, rows: int, n_items: int) -> np.ndarray:
        """This thread's [rows, n_items] score buffer (one per thread that scores: the
        workers, or the caller with one thread): no slice writes where another does,
        however many batches are in flight."""
        key = threading.get_ident()
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape[0] < rows or buffer.shape[1] != n_items:
            buffer = self._buffers[key] = _aligned_buffer(rows, n_items)
        return buffer[:rows]

    def _submit_split(
        self,
        session: ort.InferenceSession,
        feed: tuple[str, np.ndarray],
        users: np.ndarray,
        seen: SeenItems,
        item_mask: np.ndarray,
        k: int,
    ) -> Pending:
        """The batch in one slice per worker, each scored, masked and ranked on its own.

        The slices are queued and this returns at once: a caller that hands over the next
        batch before collecting this one keeps every worker busy (waiting for the slower
        slice of each batch, then for the caller, measured 7-13% of the scoring time).
        """
        n_items = item_mask.shape[0]
        denied = np.flatnonzero(np.isneginf(item_mask))
        # One slice per worker, however small: every worker scores into a buffer of its own
        # (held between batches), so fewer, bigger slices would let the workers together
        # hold more than one batch's scores (the --memory-mb budget) once idle workers had
        # taken turns at them. Slices of ~100 users score as fast per user as ~800 (one
        # thread: 2.9-3.1 s per 100k users from 32 to 256 a slice, 3.8 s at 838).
        slices = max(1, min(self._workers, len(users)))
        bounds = np.linspace(0, len(users), slices + 1).astype(np.int64)
        # Each worker's buffer is sized for the batch's largest slice, whichever it gets:
        # slices one row apart would otherwise make it again.
        rows = int(np.diff(bounds).max())
        name, values = feed

        def run(lo: int, hi: int) -> list[np.ndarray]:
            scores = self._buffer(rows, n_items)[: hi - lo]
            return self._top_k_slice(
                session, (name, values[lo:hi]), users[lo:hi], scores, seen, denied, k
            )

        if self._workers == 1:
            done = run(0, len(users))
            return lambda: (done[0], done[1])
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="mfbatch-score")
        pool = self._pool
        futures = [pool.submit(run, int(lo), int(hi)) for lo, hi in itertools.pairwise(bounds)]

        def collect() -> tuple[np.ndarray, np.ndarray]:
            parts = [future.result() for future in futures]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

        return collect

    def _top_k_slice(
        self,
        session: ort.InferenceSession,
        feed: tuple[str, np.ndarray],
        users: np.ndarray,
        scores: np.ndarray,
        seen: SeenItems,
        denied: np.ndarray,
        k: int,
    ) -> list[np.ndarray]:
        assert self._split is not None
        binding = session.io_binding()
        binding.bind_cpu_input(*feed)
        # ORT writes straight into our buffer, which is then masked in place.
        binding.bind_output("scores", "cpu", 0, np.float32, list(scores.shape), scores.ctypes.data)
        session.run_with_iobinding(binding)
        if denied.size:
            scores[:, denied] = -np.inf
        assert scores.flags.c_contiguous  # else reshape would copy and the mask be lost
        scores.reshape(-1)[seen.flat_positions(users, scores.shape[1])] = -np.inf
        outputs: list[np.ndarray] = self._split[1].run(
            ["top_items", "top_scores"], {"scores": scores, "k": np.array([k], dtype=np.int64)}
        )
        return outputs

    def _known_pairs(self, seen: SeenItems, users: np.ndarray) -> np.ndarray:
        """Seen pairs inside the model's catalogue (items added since can't be in its lists)."""
        pairs = seen.pairs(users)
        return pairs if not pairs.size else pairs[pairs[:, 1] < self.n_items]

    def _vectors_session(self) -> ort.InferenceSession:
        """The graph over user rows (fold-in), built from model.onnx's own tables once."""
        if self._vectors is None:
            providers = self.session.get_providers() if self.session is not None else [CPU]
            source: Any
            if self._split is not None and self._parts is not None:
                source = str(self._parts.vectors)
            else:  # the whole variant (CUDA, tests' oracle path) or an older export
                from mfbatch.artifact.graph import vectors_graph

                graph = vectors_graph(self._graph(), whole=self._split is None)
                source = graph.SerializeToString()
            self._vectors = ort.InferenceSession(source, self._options, providers=providers)
        return self._vectors

    def top_k_rows(
        self,
        users: np.ndarray,
        rows: np.ndarray,
        seen: SeenItems,
        item_mask: np.ndarray,
        k: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Like top_k, for users given as rows [B, d+2] (folded in) instead of indices."""
        users = np.ascontiguousarray(users, dtype=np.int64)
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        return self._queue(self._vectors_session, ("user_rows", rows), users, seen, item_mask, k)()

    def _scores_session(self) -> ort.InferenceSession:
        """What `users` go through: the split graph's first half, or the whole graph."""
        session = self._split[0] if self._split is not None else self.session
        assert session is not None
        return session

    def _queue(
        self,
        session: Callable[[], ort.InferenceSession],
        feed: tuple[str, np.ndarray],
        users: np.ndarray,
        seen: SeenItems,
        item_mask: np.ndarray,
        k: int,
    ) -> Pending:
        """`feed` through `session()`: sliced on the workers (the split graph, CPU), or the
        whole graph at once (CUDA, the oracle variant); a call that collects the lists."""
        item_mask = np.ascontiguousarray(item_mask[: self.n_items], dtype=np.float32)
        if self._split is not None:
            return self._guarded(
                len(users),
                lambda: self._submit_split(session(), feed, users, seen, item_mask, k),
            )

        def whole() -> Pending:
            inputs = {
                feed[0]: feed[1],
                "seen": self._known_pairs(seen, users),
                "item_mask": item_mask,
                "k": np.array([k], dtype=np.int64),
            }
            items, scores = session().run(["top_items", "top_scores"], inputs)
            return lambda: (items, scores)

        return self._guarded(len(users), whole)

    @staticmethod
    def _guarded(n: int, start: Callable[[], Pending]) -> Pending:
        """`start` (which queues or runs a batch) and what it returns (which collects it),
        each with ONNX Runtime's failures turned into one line."""

        def failed(exc: Exception) -> ModelError:
            return ModelError(
                f"ONNX Runtime failed on a batch of {n} users ({first_line(exc)}); "
                "lower --memory-mb or --batch-size"
            )

        try:
            pending = start()
        except Exception as exc:  # ORT's own error types (out of memory, bad shapes)
            raise failed(exc) from None

        def collect() -> tuple[np.ndarray, np.ndarray]:
            try:
                return pending()
            except Exception as exc:  # the same, raised on a worker
                raise failed(exc) from None

        return collect

    def submit_top_k(
        self, users: np.ndarray, seen: SeenItems, item_mask: np.ndarray, k: int
    ) -> Pending:
        """Queues `top_k` for these users; the call it returns waits for their lists.

        On the CPU the slices run on the scorer's workers while the caller goes on (hands
        over the next batch, assembles the last one); elsewhere the batch runs here.
        """
        users = np.ascontiguousarray(users, dtype=np.int64)
        return self._queue(self._scores_session, ("users", users), users, seen, item_mask, k)

    def top_k(
        self, users: np.ndarray, seen: SeenItems, item_mask: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(items [B, k] int64, scores [B, k] float32), best first; -inf where none is left.

        `item_mask` may be longer than the model's catalogue (items appended since): only
        the items the model knows are scored.
        """
        return self.submit_top_k(users, seen, item_mask, k)()
