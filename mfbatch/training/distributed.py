"""Data-parallel training over processes: `mfbatch train --nproc N`, or the same under torchrun.

The default (softmax) objective is batched by user, so it shards without changing what
is computed:

- Every rank draws the *same* shuffled order of users (same seed, same generator), cuts
  the same global batches as one process would, and keeps the users of each batch that
  it owns (user u belongs to rank u % world). The union of the ranks' step batches is the
  single-process batch.
- Each rank's loss is scaled by its share of the global batch's ratings, so the SUM of
  the ranks' gradients is the single-process gradient (up to the per-batch normalisation
  of the user weights, which each rank computes over its own users).
- The item table, item biases and the other shared parameters are synchronised by one
  all-reduce of their flattened gradients per step. A user row only ever gets a gradient
  on its owner rank; the user table is assembled from the owners at the end of every
  epoch (a masked all-reduce), so validation, early stopping and the checkpoint see the
  same weights on every rank and the ranks stay in lockstep without messages of their own.
- Only rank 0 records the run and exports the model (mfbatch.stages.train).

gloo on CPU, NCCL on GPUs (one GPU per rank, cuda:LOCAL_RANK). `--nproc N` starts N-1
worker processes and runs rank 0 itself; under torchrun the environment says who is who.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mfbatch.errors import ConfigError, ModelError

# A rank that dies leaves the others waiting in a collective: they give up after this.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
USER_PARAMS = ("user_emb.weight", "user_bias.weight")


@dataclass(frozen=True)
class Shard:
    """This process's place in the group; `world == 1` is plain single-process training."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def device(self, device: torch.device) -> torch.device:
        """One GPU per rank on a node: cuda:LOCAL_RANK."""
        if device.type == "cuda" and self.active:
            if self.local_rank >= torch.cuda.device_count():
                raise ConfigError(
                    f"--nproc: rank {self.rank} wants cuda:{self.local_rank} but this node has "
                    f"{torch.cuda.device_count()} GPU(s); start one process per GPU, or "
                    "--device cpu"
                )
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def owned(self, users: torch.Tensor) -> torch.Tensor:
        """Bool mask: which of `users` this rank owns."""
        return users % self.world == self.rank

    def step_share(
        self, global_batch: torch.Tensor, counts: torch.Tensor
    ) -> tuple[torch.Tensor, float]:
        """(this rank's users of a global batch, its share of the batch's ratings).

        Every rank can compute the global count itself (all hold the same order and the
        per-user counts), so no collective is needed for the scale.
        """
        mine = global_batch[self.owned(global_batch)]
        total = int(counts[global_batch].sum())
        return mine, int(counts[mine].sum()) / max(total, 1)

    def sync_gradients(self, model: torch.nn.Module) -> None:
        """SUM the shared parameters' gradients over ranks (one flat all-reduce)."""
        shared = [p for n, p in model.named_parameters() if n not in USER_PARAMS]
        grads = []
        for p in shared:
            if p.grad is None:
                # A rank whose slice was empty (or a parameter this loss does not use)
                # still takes part, with zeros, or the collective would not line up.
                p.grad = torch.zeros_like(p)
            if p.grad.is_sparse:
                p.grad = p.grad.to_dense()
            grads.append(p.grad.reshape(-1))
        flat = torch.cat(grads)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in shared:
            n = p.numel()
            assert p.grad is not None
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    @torch.no_grad()
    def gather_users(self, model: torch.nn.Module) -> None:
        """Every rank gets every user row from its owner (rows of others are stale)."""
        params = dict(model.named_parameters())
        for name in USER_PARAMS:
            table = params[name]
            rows = torch.arange(table.shape[0], device=table.device)
            owned = self.owned(rows).to(table.dtype).unsqueeze(1)
            summed = table * owned
            dist.all_reduce(summed, op=dist.ReduceOp.SUM)
            table.copy_(summed)

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """SUM over ranks (each rank's loss is already its share of the global loss)."""
        if self.active:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (a run id: one run, however many processes)."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def from_env() -> Shard:
    """The rank torchrun (or `spawn`) put in the environment; one process if none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Shard()
    return Shard(
        rank=int(os.environ["RANK"]),
        world=world,
        local_rank=int(os.environ.get("LOCAL_RANK", os.environ["RANK"])),
    )


def init(shard: Shard, device: torch.device) -> None:
    """Join the process group: NCCL when this rank trains on a GPU, else gloo."""
    if not shard.active or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend=backend, rank=shard.rank, world_size=shard.world, timeout=COLLECTIVE_TIMEOUT
    )


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, world: int, port: int, target: Callable[..., Any], args: Any) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        target(*args)
    finally:
        shutdown()


def spawn(
    nproc: int, target: Callable[..., Any], args: tuple[Any, ...], main: Callable[[], Any]
) -> Any:
    """Run `target(*args)` as ranks 1..N-1 in new processes and `main()` as rank 0 here.

    Rank 0 runs in this process so its summary and errors reach the caller as they would
    without `--nproc`. If rank 0 fails, the workers are stopped rather than left waiting
    in a collective; if a worker fails, its exit code is reported.
    """
    port = _free_port()
    ctx = mp.get_context("spawn")
    workers = [
        ctx.Process(target=_worker, args=(rank, nproc, port, target, args), daemon=True)
        for rank in range(1, nproc)
    ]
    for worker in workers:
        worker.start()
    saved = {
        k: os.environ.get(k)
        for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    os.environ.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE=str(nproc),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    ok = False
    try:
        result = main()
        ok = True
    finally:
        shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for worker in workers:
            worker.join(timeout=60 if ok else 1)
            if worker.is_alive():
                worker.terminate()
                worker.join()
    failed = [w.exitcode for w in workers if w.exitcode != 0]
    if failed:
        raise ModelError(
            f"--nproc {nproc}: {len(failed)} worker process(es) failed (exit code "
            f"{failed[0]}); see their output above"
        )
    return result
