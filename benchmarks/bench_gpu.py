"""GPU figures: scoring on CUDA (ORT's CUDA provider vs the torch GPU floor) and training.

    python benchmarks/bench_gpu.py [--users 1000000] [--items 100000] [--dim 64]
                                    [--seen 93] [--ml100k PATH/u.data] [--out FILE]

Needs only torch (with CUDA) and numpy: the GPU machine may have no package registry and
none of polars, duckdb or onnxruntime-gpu. Whatever can't run there is recorded in the
JSON as not run, with the reason; nothing is estimated.

Scoring, one synthetic model (random tables; speed does not depend on them), seen items
popularity-skewed, K=20, all users in batches sized from the free GPU memory:
  torch floor:  U[b] @ V^T then topk, no masking (fp32 and fp16 scores);
  torch masked: the same with the seen items and a deny list set to -inf on the device;
  ORT CUDA:     mfbatch's exported graph (model.onnx layout) on the CUDA provider, inputs
                and outputs bound on the device (IO binding), seen pairs built on the device.
Each path's lists are checked against a float64 numpy oracle on a sample of users.
Training: the default objective with bf16 autocast, data resident on the device, on
ML-100K (when --ml100k points at its u.data; the GPU machine can't download it) and on a
synthetic set of --train-users users: examples/s and the time to the validated model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

K = 20
ROOT = Path(__file__).resolve().parents[1]


def import_mfbatch() -> None:
    """Make mfbatch's torch-only modules importable where its API's dependencies are not."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        import mfbatch  # noqa: F401
    except ImportError:
        # `import mfbatch` loads the whole API (polars, duckdb); the model, the trainer and
        # the graph builder need none of it, so load the package without its __init__.
        package = types.ModuleType("mfbatch")
        package.__path__ = [str(ROOT / "mfbatch")]
        package.__version__ = "0+gpu-check"  # type: ignore[attr-defined]
        sys.modules["mfbatch"] = package


def synchronized(fn: Callable[[], Any]) -> tuple[Any, float]:
    torch.cuda.synchronize()
    started = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - started


def synthetic_seen(
    n_users: int, n_items: int, per_user: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR (indptr, indices) of ~per_user popularity-skewed distinct items per user."""
    generator = torch.Generator(device=device).manual_seed(seed)
    weights = (torch.arange(n_items, device=device, dtype=torch.float64) + 1.0) ** -0.8
    cdf = torch.cumsum(weights / weights.sum(), 0)
    draws = torch.rand(n_users * per_user, device=device, generator=generator, dtype=torch.float64)
    items = torch.searchsorted(cdf, draws).clamp_(max=n_items - 1)
    users = torch.arange(n_users, device=device).repeat_interleave(per_user)
    pairs = torch.unique(users * n_items + items)  # sorted: by user, then item
    counts = torch.bincount(pairs // n_items, minlength=n_users)
    indptr = torch.zeros(n_users + 1, dtype=torch.int64, device=device)
    indptr[1:] = torch.cumsum(counts, 0)
    return indptr, pairs % n_items


def seen_pairs(
    indptr: torch.Tensor, indices: torch.Tensor, users: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row in `users`, item) of every seen item of the batch, built on the device."""
    starts, ends = indptr[users], indptr[users + 1]
    lengths = ends - starts
    rows = torch.repeat_interleave(torch.arange(users.numel(), device=users.device), lengths)
    within = (
        torch.arange(rows.numel(), device=users.device) - (torch.cumsum(lengths, 0) - lengths)[rows]
    )
    return rows, indices[starts[rows] + within]


def torch_top_k(
    u: torch.Tensor,
    vt: torch.Tensor,
    users: torch.Tensor,
    seen: tuple[torch.Tensor, torch.Tensor] | None,
    item_mask: torch.Tensor | None,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(items, scores) best first; `u`/`vt` in the dtype the scores are computed in."""
    scores = u[users] @ vt
    if item_mask is not None:
        scores += item_mask
    if seen is not None:
        rows, items = seen_pairs(seen[0], seen[1], users)
        scores[rows, items] = float("-inf")
    top = torch.topk(scores, k, dim=1, largest=True, sorted=True)
    return top.indices, top.values


def oracle_rows(
    u: np.ndarray,
    vt: np.ndarray,
    users: np.ndarray,
    seen: tuple[np.ndarray, np.ndarray],
    mask: np.ndarray,
) -> np.ndarray:
    """float64 masked scores of `users`: what every path must rank."""
    full = u[users].astype(np.float64) @ vt.astype(np.float64) + mask.astype(np.float64)
    indptr, indices = seen
    for row, user in enumerate(users):
        full[row, indices[indptr[user] : indptr[user + 1]]] = -np.inf
    return full


def agreement(full: np.ndarray, items: np.ndarray, tie: float) -> float:
    """Share of lists that equal the oracle's (a swap inside a near-tie counts as equal)."""
    scores = np.take_along_axis(full, items, axis=1)
    order = np.argsort(-full, axis=1, kind="stable")[:, : items.shape[1]]
    best = np.take_along_axis(full, order, axis=1)
    same = np.all((items == order) | (np.abs(scores - best) < tie), axis=1)
    return float(same.mean())


def batch_users(n_items: int, reserve: float = 0.5) -> int:
    """Users per batch so ~3 [B, I] float32 buffers use `reserve` of the free GPU memory."""
    free, _ = torch.cuda.mem_get_info()
    return int(max(256, min(65536, free * reserve // (n_items * 4 * 3))))


def bench_scoring(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {"users": args.users, "items": args.items, "dim": args.dim, "k": K}
    generator = torch.Generator(device=device).manual_seed(0)
    width = args.dim + 2
    u = torch.randn(args.users, width, device=device, generator=generator) * 0.3
    vt = torch.randn(width, args.items, device=device, generator=generator) * 0.3
    indptr, indices = synthetic_seen(args.users, args.items, args.seen, device)
    mask = torch.zeros(args.items, device=device)
    mask[torch.randperm(args.items, device=device, generator=generator)[: args.items // 100]] = (
        float("-inf")
    )
    batch = batch_users(args.items)
    out["batch"] = batch
    out["seen_per_user"] = indices.numel() / args.users
    everyone = torch.arange(args.users, device=device)
    sample = torch.randperm(args.users, device=device, generator=generator)[:256].sort().values
    host = {
        "u": u.cpu().numpy(),
        "vt": vt.cpu().numpy(),
        "seen": (indptr.cpu().numpy(), indices.cpu().numpy()),
        "mask": mask.cpu().numpy(),
    }
    full = oracle_rows(host["u"], host["vt"], sample.cpu().numpy(), host["seen"], host["mask"])

    def all_users(top_k: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> float:
        def run() -> None:
            for start in range(0, args.users, batch):
                items, scores = top_k(everyone[start : start + batch])
                # The lists leave the device, as serving needs them on the host.
                items.cpu(), scores.cpu()

        run()  # warm-up: kernels, allocator
        return min(synchronized(run)[1] for _ in range(args.repeats))

    u16, vt16 = u.half(), vt.half()
    paths: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
        "torch_floor_fp32": lambda b: torch_top_k(u, vt, b, None, None, K),
        "torch_floor_fp16": lambda b: torch_top_k(u16, vt16, b, None, None, K),
        "torch_masked_fp32": lambda b: torch_top_k(u, vt, b, (indptr, indices), mask, K),
        "torch_masked_fp16": lambda b: torch_top_k(u16, vt16, b, (indptr, indices), mask.half(), K),
    }
    for name, fn in paths.items():
        seconds = all_users(fn)
        out[name] = {"seconds": seconds, "exact_scores_per_s": args.users * args.items / seconds}
        if "masked" in name:
            items, _ = fn(sample)
            out[name]["lists_equal_to_fp64_oracle"] = agreement(full, items.cpu().numpy(), 1e-3)
        print(f"  {name:<20} {seconds:7.3f} s", flush=True)
    out["ort_cuda"] = bench_ort_cuda(
        args, u, vt, (indptr, indices), mask, batch, sample, full, all_users
    )
    floor = out["torch_floor_fp32"]["seconds"]
    if "seconds" in out["ort_cuda"]:
        out["ort_cuda_vs_torch_floor_fp32"] = out["ort_cuda"]["seconds"] / floor
    return out


def bench_ort_cuda(
    args: argparse.Namespace,
    u: torch.Tensor,
    vt: torch.Tensor,
    seen: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
    batch: int,
    sample: torch.Tensor,
    full: np.ndarray,
    all_users: Callable[[Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]], float],
    k: int = K,
) -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return {"run": False, "why": f"onnxruntime is not installed here ({exc})"}
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {
            "run": False,
            "why": f"onnxruntime {ort.__version__} has no CUDA provider "
            f"({', '.join(ort.get_available_providers())}); install onnxruntime-gpu",
        }
    try:
        from mfbatch.artifact.graph import build_graph
    except ImportError as exc:
        return {"run": False, "why": f"the onnx package is missing ({exc})"}
    proto = build_graph(
        u.cpu().numpy(), vt.cpu().numpy(), {"n_users": args.users, "n_items": args.items}
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CUDAExecutionProvider"]
    )
    del proto
    if "CUDAExecutionProvider" not in session.get_providers():
        return {"run": False, "why": "the CUDA provider failed to load"}
    k_input = np.array([k], dtype=np.int64)

    def top_k(users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, items = seen_pairs(seen[0], seen[1], users)
        pairs = torch.stack([rows, items], dim=1).contiguous()
        users = users.contiguous()
        top_items = torch.empty((users.numel(), k), dtype=torch.int64, device=users.device)
        top_scores = torch.empty((users.numel(), k), dtype=torch.float32, device=users.device)
        binding = session.io_binding()
        for name, tensor, dtype in (
            ("users", users, np.int64),
            ("seen", pairs, np.int64),
            ("item_mask", mask, np.float32),
        ):
            binding.bind_input(name, "cuda", 0, dtype, list(tensor.shape), tensor.data_ptr())
        # TopK reads k on the host.
        binding.bind_cpu_input("k", k_input)
        binding.bind_output(
            "top_items", "cuda", 0, np.int64, [users.numel(), k], top_items.data_ptr()
        )
        binding.bind_output(
            "top_scores", "cuda", 0, np.float32, [users.numel(), k], top_scores.data_ptr()
        )
        # ORT runs on its own stream: torch's work that produced the inputs must be done.
        torch.cuda.synchronize()
        session.run_with_iobinding(binding)
        # ...and ORT's writes must be done before torch reads the outputs.
        binding.synchronize_outputs()
        return top_items, top_scores

    seconds = all_users(top_k)
    items, _ = top_k(sample)
    print(f"  {'ort_cuda':<20} {seconds:7.3f} s", flush=True)
    return {
        "run": True,
        "seconds": seconds,
        "exact_scores_per_s": args.users * args.items / seconds,
        "lists_equal_to_fp64_oracle": agreement(full, items.cpu().numpy(), 1e-3),
        "onnxruntime": ort.__version__,
    }


def ratings_ml100k(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    raw = np.loadtxt(path, dtype=np.int64, usecols=(0, 1, 2))
    users = np.unique(raw[:, 0], return_inverse=True)[1]
    items = np.unique(raw[:, 1], return_inverse=True)[1]
    return users, items, (raw[:, 2] - 1.0) / 4.0, f"ML-100K ({path})"


def ratings_synthetic(n_users: int, n_items: int, per_user: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    weights = (np.arange(n_items) + 1.0) ** -0.8
    items = np.searchsorted(np.cumsum(weights / weights.sum()), rng.random(n_users * per_user))
    users = np.repeat(np.arange(n_users), per_user)
    pairs = np.unique(users * n_items + np.minimum(items, n_items - 1))
    ratings = rng.integers(1, 6, pairs.size) / 5.0
    return pairs // n_items, pairs % n_items, ratings


def bench_training(
    users: np.ndarray,
    items: np.ndarray,
    ratings: np.ndarray,
    epochs: int | None,
    device: torch.device,
) -> dict[str, Any]:
    """The default objective on the device, bf16 autocast; a random 10% validated on."""
    from mfbatch.config import TrainConfig
    from mfbatch.training.loop import train_model
    from mfbatch.training.model import MatrixFactorization, ModelShape
    from mfbatch.training.tensors import Csr, Interactions
    from mfbatch.training.validation import Validation

    n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
    config = TrainConfig(device="cuda", amp=True, epochs=epochs)
    held = np.random.default_rng(1).random(users.size) < 0.1

    def on_device(where: np.ndarray) -> Interactions:
        return Interactions(
            users=torch.as_tensor(users[where], device=device),
            items=torch.as_tensor(items[where], device=device),
            ratings=torch.as_tensor(ratings[where], dtype=torch.float32, device=device),
        )

    started = time.perf_counter()
    data, pairs = on_device(~held), on_device(held)
    popular, untrained = Validation.serving_rules(data.items, n_items)
    candidates = np.unique(users[held])
    if candidates.size > config.eval_users:
        rng = np.random.default_rng(config.seed)
        candidates = np.sort(rng.choice(candidates, config.eval_users, replace=False))
    val = Validation(
        pairs=pairs,
        train_items=Csr.build(data.users, data.items, n_users),
        val_items=Csr.build(pairs.users, pairs.items, n_users),
        rank_users=torch.as_tensor(candidates, device=device),
        rating_min=1.0,
        rating_max=5.0,
        popular=popular,
        untrained_items=untrained,
    )
    torch.manual_seed(config.seed)
    shape = ModelShape(n_users, n_items, int(config.embedding_dim or 0), config.dropout, False)
    model = MatrixFactorization(shape).to(device)
    outcome, seconds = synchronized(lambda: train_model(model, data, val, config))
    epoch_seconds = sum(r.seconds for r in outcome.history)
    examples = len(data) * len(outcome.history)
    last = next((r.metrics for r in reversed(outcome.history) if r.metrics), None)
    return {
        "objective": config.objective,
        "amp": "bf16",
        "users": n_users,
        "items": n_items,
        "train_ratings": len(data),
        "epochs_run": len(outcome.history),
        "best_epoch": outcome.best_epoch,
        "status": outcome.status,
        # Epoch time includes each epoch's validation, so this understates the step rate.
        "examples_per_s": examples / epoch_seconds if epoch_seconds else None,
        "seconds_to_validated_model": time.perf_counter() - started,
        "seconds_training": seconds,
        "val_recall": getattr(last, "recall", None),
        "val_ndcg": getattr(last, "ndcg", None),
    }


def run_gpu_tests() -> dict[str, Any]:
    """tests/test_gpu.py's `gpu` tests, in this process; their outcome goes into the JSON."""
    try:
        import pytest
    except ImportError as exc:
        return {"run": False, "why": f"pytest is not installed here ({exc})"}
    outcomes: dict[str, list[str]] = {"passed": [], "failed": [], "skipped": []}

    class Collect:
        def pytest_runtest_logreport(self, report: Any) -> None:
            if report.when == "call" or report.outcome != "passed":
                outcomes[report.outcome].append(report.nodeid)

    # --noconftest: tests/conftest.py needs duckdb and the CLI, which the GPU machine may lack.
    code = pytest.main(
        [
            str(ROOT / "tests" / "test_gpu.py"),
            "-m",
            "gpu",
            "--noconftest",
            "-p",
            "no:cacheprovider",
            "-q",
        ],
        plugins=[Collect()],
    )
    return {"run": True, "exit_code": int(code), **outcomes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seen", type=int, default=93)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ml100k", type=Path, help="ML-100K's u.data, if it is on the machine")
    parser.add_argument("--train-users", type=int, default=1_000_000)
    parser.add_argument("--train-items", type=int, default=20_000)
    parser.add_argument("--train-per-user", type=int, default=20)
    parser.add_argument("--train-epochs", type=int, default=2, help="synthetic set's epochs")
    parser.add_argument("--budget-s", type=float, default=180, help="skip later parts past it")
    parser.add_argument("--tests", action="store_true", help="run the gpu tests first")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()
    report: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}

    def save() -> None:
        # After every part: a run cut off by the time limit still leaves what it measured.
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2, default=str))

    if args.tests:
        report["tests"] = run_gpu_tests()
        save()
    if not torch.cuda.is_available():
        report["why"] = "torch sees no CUDA device here: nothing was measured"
        print(report["why"])
    else:
        import_mfbatch()
        device = torch.device("cuda")
        report["device"] = torch.cuda.get_device_name(device)
        print(
            f"scoring on {report['device']}: {args.users:,} users x {args.items:,} items",
            flush=True,
        )
        report["scoring"] = bench_scoring(args, device)
        save()
        torch.cuda.empty_cache()
        if args.ml100k is not None and args.ml100k.is_file():
            users, items, ratings, name = ratings_ml100k(args.ml100k)
            print(f"training on {name}", flush=True)
            report["train_ml100k"] = bench_training(users, items, ratings, None, device)
            save()
        else:
            report["train_ml100k"] = {
                "run": False,
                "why": "no ML-100K u.data given (--ml100k); the GPU machine can't download it",
            }
        if time.perf_counter() - started > args.budget_s:
            report["train_synthetic"] = {
                "run": False,
                "why": f"over the {args.budget_s:.0f} s budget before it could start",
            }
        else:
            print(f"training on {args.train_users:,} synthetic users", flush=True)
            users, items, ratings = ratings_synthetic(
                args.train_users, args.train_items, args.train_per_user
            )
            report["train_synthetic"] = bench_training(
                users, items, ratings, args.train_epochs, device
            )
    report["seconds"] = time.perf_counter() - started
    save()
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
