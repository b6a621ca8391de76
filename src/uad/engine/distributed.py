"""Data-parallel training and sharded inference on ``torch.distributed`` (gloo on CPU, NCCL on GPU).

The engine is the same code with one or many processes; these helpers are what differs:

* the process group: :func:`init_from_env` (``torchrun`` sets ``RANK`` / ``WORLD_SIZE`` /
  ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``) or :func:`launch` (spawn ``world`` local
  processes and run a function in each, for ``engine.strategy: ddp`` started from one command);
* gradients: :func:`average_gradients` all-reduces every trainable gradient (flattened per device
  and dtype into one buffer each: one collective per step, as DDP's buckets) and divides by the
  world size, so a step on ``world`` shards of a batch equals the step on the whole batch;
* batch statistics that a paper takes over the *whole* batch (Dinomaly's hard-mining threshold,
  INP-Former++'s batch-mean error weights, a Dice / soft-IoU over the batch):
  :func:`gather_cat` (no gradient) and :func:`sum_across` (differentiable: each rank's gradient
  becomes the sum over ranks, which the gradient average turns back into the whole-batch one).

With one process every helper is the identity, so the single-process path runs no collective.
"""

from __future__ import annotations

import os
import socket
import tempfile
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "is_active", "rank", "world_size", "is_main", "init_from_env", "average_gradients", "gather_cat",
    "sum_across", "mean_across", "barrier", "launch", "local_world", "free_port", "shard_indices", "all_gather_objects",
]


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_active() and world_size() > 1:
        dist.barrier()


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1);
    False when there is none. On CUDA each process takes the GPU ``LOCAL_RANK``."""
    if is_active():
        return True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if os.environ.get("MASTER_ADDR", "127.0.0.1") in ("127.0.0.1", "localhost", "::1"):
        _bind_loopback()  # torchrun on one machine; with several, MASTER_ADDR says where to bind
    dist.init_process_group(backend=backend)
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _portable(obj: Any) -> Any:
    """numpy arrays as tensors (numbers) or lists (strings), so the result loads with
    ``weights_only=True`` (no arbitrary unpickling)."""
    import numpy as np

    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "US":
            return {"__np_str__": obj.tolist()}
        return {"__np__": torch.from_numpy(obj.copy())}  # a copy keeps 0-d arrays 0-d
    if isinstance(obj, dict):
        return {k: _portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_portable(v) for v in obj)
    return obj


def _restore(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, dict):
        if set(obj) == {"__np__"}:
            return obj["__np__"].numpy()
        if set(obj) == {"__np_str__"}:
            return np.asarray(obj["__np_str__"], dtype=str)
        return {k: _restore(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_restore(v) for v in obj)
    return obj


def loopback_interface() -> str | None:
    """The name of this machine's loopback interface (``lo`` on Linux, ``lo0`` on macOS), if any."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):
        return None
    return next((n for n in names if n in ("lo", "lo0")), next((n for n in names if n.startswith("lo")), None))


def _bind_loopback() -> None:
    """Collective sockets of a single-node group on the loopback interface only (gloo and NCCL
    otherwise listen on every address); the user's own ``*_SOCKET_IFNAME`` wins."""
    lo = loopback_interface()
    if lo is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", lo)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", lo)


def _worker(local_rank: int, world: int, port: int, backend: str, fn: Callable, args: tuple, kwargs: dict,
            out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    else:  # CPU ranks share the cores instead of each taking all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    # one machine: the rendezvous is a file in the private folder (no TCP store listening on every
    # address) and the collectives' sockets stay on the loopback interface
    _bind_loopback()
    store = dist.FileStore(os.path.join(out_dir, "rendezvous"), world)
    dist.init_process_group(backend=backend, store=store, rank=local_rank, world_size=world)
    try:
        result = fn(*args, **kwargs)
        if local_rank == 0:
            tmp = os.path.join(out_dir, "result.pt.tmp")
            torch.save(_portable(result), tmp)
            os.replace(tmp, os.path.join(out_dir, "result.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def launch(fn: Callable, args: tuple = (), world: int = 2, backend: str | None = None,
           kwargs: dict | None = None) -> Any:
    """Run ``fn(*args, **kwargs)`` in ``world`` spawned local processes joined in one process
    group (ranks 0 .. world-1, GPU ``rank`` each with NCCL) and return rank 0's result. ``fn`` and
    the arguments must be picklable; the result travels back through a private temporary file as
    tensors, numpy arrays and plain containers, loaded with ``weights_only=True``."""
    backend = backend or default_backend()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="uad-ddp-") as out:
        torch.multiprocessing.start_processes(_worker, args=(world, port, backend, fn, args, dict(kwargs or {}), out),
                                              nprocs=world, join=True, start_method="spawn")
        return _restore(torch.load(os.path.join(out, "result.pt"), weights_only=True))


def local_world(devices: int | None) -> int:
    """How many ranks a node-launched data-parallel run starts: ``devices``, else every GPU, else 2."""
    if devices:
        return int(devices)
    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """All-reduce the gradients of ``params`` and divide by the world size (a missing gradient
    counts as zeros, so every rank runs the same collectives)."""
    world = world_size()
    if world <= 1:
        return
    groups: dict[tuple, list[torch.nn.Parameter]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        groups.setdefault((p.grad.device, p.grad.dtype), []).append(p)
    for ps in groups.values():
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for p in ps:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


def gather_cat(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The tensors of every rank (same shape) concatenated in rank order along ``dim`` (no gradient)."""
    if world_size() <= 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=dim)


def sum_across(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over ranks, differentiable (the backward sums the ranks' gradients)."""
    if world_size() <= 1:
        return t
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t)


@torch.no_grad()
def mean_across(value: float | torch.Tensor) -> float:
    """The mean of a scalar over ranks (for logging and the non-finite guard)."""
    t = torch.as_tensor(value, dtype=torch.float64).reshape(1)
    if world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        t /= world_size()
    return float(t.item())


def mean_across_all(values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean over ranks of a float tensor (one all-reduce), as float64 on the CPU."""
    t = values.detach().to(torch.float64)
    if world_size() > 1:
        t = t.cuda() if dist.get_backend() == "nccl" else t.cpu()
        dist.all_reduce(t)
        t /= world_size()
    return t.cpu()


def shard_indices(n: int, rank_: int | None = None, world: int | None = None, batch: int = 1) -> list[int]:
    """The contiguous block of ``range(n)`` that ``rank`` scores in sharded inference: whole
    batches of ``batch`` (so every rank's batches are exactly the single process's batches and
    the outputs are bit-identical), blocks in rank order, differing by at most one batch."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    batches = -(-n // batch)
    base, extra = divmod(batches, w)
    first = r * base + min(r, extra)
    last = first + base + (1 if r < extra else 0)
    return list(range(first * batch, min(last * batch, n)))


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if world_size() <= 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
