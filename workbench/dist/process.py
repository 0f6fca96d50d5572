"""Processes and their group: who am I (rank), how many are we (world size), and how we talk.

``torch.distributed`` runs one Python process per device. Each process learns its place from the
environment that ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) and joins a *process group*, the set of processes that exchange tensors by
collectives (all-reduce, broadcast, all-to-all). The backend that carries them is picked from the
device: **NCCL** between CUDA devices (NVLink and InfiniBand on a cluster), **gloo** between CPU
processes (TCP through the loopback on one machine). The same program runs on either.

    torchrun --nproc-per-node 2 -m workbench train --preset tiny --steps 100 --out runs/dp

``setup`` joins (or reuses) the group; ``launch`` starts ``world_size`` CPU processes of a function on
this machine with gloo, which is how the tests, the benchmark and lesson 11 run distributed code
without ``torchrun``; ``on_main`` runs a piece of work (a file write, a decision) on rank 0 alone and
hands every rank its result, or its error, so that a refusal on rank 0 never leaves the others
waiting forever in a collective.

Where it simplifies: one process group for everything (a cluster would keep separate groups for data,
expert and pipeline parallelism on a device mesh); "nodes" are groups of consecutive ranks that we
declare (``ranks_per_node``), not machines.
"""

from __future__ import annotations

import os
import pickle
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from workbench.util import resolve_device

BACKENDS = ("auto", "gloo", "nccl")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Group:
    """This process's place in the process group."""

    rank: int  # 0 .. world_size - 1
    world_size: int  # processes in the group
    local_rank: int  # index of this process on its machine (its CUDA device)
    backend: str  # "gloo" or "nccl"
    device: torch.device  # where this process computes
    created: bool  # whether ``setup`` created the group (then ``close`` destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        """Leave the group if ``setup`` created it (a group made by the caller stays)."""
        if self.created and dist.is_initialized():
            dist.destroy_process_group()


def env_world_size() -> int:
    """WORLD_SIZE from the environment (1 when not launched by torchrun); a bad value is refused."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(raw)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={raw!r} in the environment is not an integer; launch with torchrun") from None
    if world < 1:
        raise ValueError(f"WORLD_SIZE={world} in the environment must be >= 1")
    return world


def is_main_process() -> bool:
    """Rank 0 of a running group, or of the torchrun launch; True in a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def distributed_requested() -> bool:
    """Whether this process is one of several: a group is running, or torchrun started more than one."""
    return (dist.is_available() and dist.is_initialized()) or env_world_size() > 1


def _device_for(device: str, local_rank: int) -> torch.device:
    """The device of this process: ``"auto"`` is CUDA device ``local_rank`` when CUDA exists, else the CPU."""
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = resolve_device(f"cuda:{local_rank}")
    return dev


def setup(device: str = "auto", backend: str = "auto", timeout_s: float = 600.0) -> Group:
    """Join the process group: reuse one that is running, else create it from torchrun's environment
    (a group of one when nothing was launched). backend ``"auto"``: NCCL for CUDA, gloo for the CPU."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; install a build with it to run distributed")
    created = False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        chosen = dist.get_backend()
        dev = _device_for(device, local_rank)
        if "nccl" in str(chosen) and dev.type != "cuda":
            raise ValueError(f"the running process group uses NCCL, which needs CUDA devices; device={device!r}")
    else:
        world = env_world_size()
        rank = int(os.environ.get("RANK", "0"))
        dev = _device_for(device, local_rank)
        chosen = ("nccl" if dev.type == "cuda" else "gloo") if backend == "auto" else backend
        if chosen == "nccl" and dev.type != "cuda":
            raise ValueError("backend 'nccl' needs CUDA devices; use backend 'gloo' (or 'auto') on the CPU")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if world == 1 and "MASTER_ADDR" not in os.environ:  # a group of one: nothing to rendezvous with
            dist.init_process_group(chosen, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timedelta(seconds=timeout_s))  # fmt: skip
        else:
            missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
            if missing:
                raise ValueError(f"WORLD_SIZE={world} but {', '.join(missing)} unset; launch with torchrun")
            dist.init_process_group(chosen, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        created = True
    return Group(rank=rank, world_size=world, local_rank=local_rank, backend=str(chosen), device=dev, created=created)


def on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and return its result on every rank; an exception it raises is raised on
    every rank (so a refused folder or a full disk stops all processes, none waits for the others)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", fn())]
        except Exception as e:  # noqa: BLE001 - handed to every rank, then raised
            box = [("error", e)]
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


def broadcast_value(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a small picklable object, e.g. a path or a list of metric rows)."""
    return on_main(lambda: value)


# ---- starting CPU processes on this machine ---------------------------------------------------------
def free_port() -> int:
    """A TCP port that is free now on the loopback (for the rendezvous of ``launch``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, threads: int, queue, args, kwargs) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})  # fmt: skip
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
    try:
        result = fn(*args, **kwargs)
        queue.put(pickle.dumps((rank, result)))  # plain pickling copies tensors (no shared memory to outlive us)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], world_size: int, *args: Any, threads: int = 1, **kwargs: Any) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` in ``world_size`` CPU processes joined by gloo; returns each rank's result,
    by rank. The processes are forked (fast: no second import of torch) where the platform allows.

    ``fn`` sees a running group (``torch.distributed.get_rank()``, ...). Results travel back through a
    queue, so keep them small (numbers, lists, CPU tensors). An exception in any rank is raised here with
    that rank's traceback; a rank stuck in a collective gives up after two minutes.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or not 1 <= world_size <= 64:
        raise ValueError(f"world_size must be an integer between 1 and 64, got {world_size!r}")
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = mp.start_processes(_entry, args=(fn, world_size, port, threads, queue, args, kwargs),
                               nprocs=world_size, start_method=method, join=False)  # fmt: skip
    results: dict[int, Any] = {}

    def drain() -> None:  # read while they run: a large result must not wait on a full pipe
        while not queue.empty():
            rank, value = pickle.loads(queue.get())
            results[rank] = value

    while True:
        drain()
        if procs.join(timeout=0.05):  # raises with the failing rank's traceback
            break
    drain()
    return [results.get(r) for r in range(world_size)]


__all__ = [
    "BACKENDS",
    "Group",
    "broadcast_value",
    "distributed_requested",
    "env_world_size",
    "free_port",
    "is_main_process",
    "launch",
    "on_main",
    "setup",
]
