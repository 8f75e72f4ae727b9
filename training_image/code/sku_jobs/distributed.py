"""Process-group set-up and tear-down for the training job.

Backends, in order: SMDDP (``smddp``) when the SageMaker library is importable (the p4d DLC),
NCCL on GPU, gloo on CPU. Rank and world size come from torchrun (``RANK`` / ``WORLD_SIZE``
/ ``LOCAL_RANK``) or from Open MPI (``OMPI_COMM_WORLD_*``; SageMaker launches SMDDP jobs
with mpirun). With neither, the job is one plain process.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str | None
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env(environ: dict[str, str] | None = None) -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) from torchrun or MPI variables."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env and "RANK" in env:
        world = int(env["WORLD_SIZE"])
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        return int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)), local_world
    if "OMPI_COMM_WORLD_SIZE" in env:
        world = int(env["OMPI_COMM_WORLD_SIZE"])
        local_world = int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", world))
        return (
            int(env.get("OMPI_COMM_WORLD_RANK", 0)),
            world,
            int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
            local_world,
        )
    return 0, 1, 0, 1


def smddp_available() -> bool:
    """True when SMDDP registered its ``smddp`` backend (importing it does the registering)."""
    try:
        import smdistributed.dataparallel.torch.torch_smddp  # noqa: F401
    except ImportError:
        return False
    return True


def init_distributed(use_gpu: bool | None = None) -> DistInfo:
    """Initialise the default process group when the job has more than one process."""
    if use_gpu is None:
        use_gpu = torch.cuda.is_available()
    rank, world, local_rank, local_world = world_from_env()
    if use_gpu:
        torch.cuda.set_device(local_rank % max(1, torch.cuda.device_count()))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world <= 1:
        return DistInfo(0, 1, 0, 1, None, device)

    if use_gpu and smddp_available():
        backend = "smddp"
        dist.init_process_group(backend=backend)
    else:
        backend = "nccl" if use_gpu else "gloo"
        # mpirun sets no rendezvous address; SageMaker's first host is the natural master.
        if "MASTER_ADDR" not in os.environ:
            hosts = json.loads(os.environ.get("SM_HOSTS", '["127.0.0.1"]'))
            os.environ["MASTER_ADDR"] = hosts[0] if len(hosts) > 1 else "127.0.0.1"
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    # SMDDP may reorder ranks; trust the process group from here on.
    rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local_rank, local_world, backend, device)


def teardown() -> None:
    """Destroy the process group if one exists (safe to call twice or on error paths)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except (RuntimeError, ValueError):
            pass


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks and return it (on the caller's device and dtype).

    NCCL/SMDDP need the tensor on the GPU; SMDDP is only relied on for float32.
    """
    if not info.distributed:
        return values
    comm = values
    if info.backend != "gloo":
        comm = values.to(info.device, dtype=torch.float32 if info.backend == "smddp" else values.dtype)
    dist.all_reduce(comm, op=dist.ReduceOp.SUM)
    return comm.to(values.device, values.dtype)


def sync_buffers(module: torch.nn.Module, info: DistInfo, src: int = 0) -> None:
    """Give every rank rank ``src``'s buffers (BatchNorm running statistics).

    Each rank updates its own running statistics in its last training forward (DDP broadcasts
    buffers only at the start of a forward), so without this the ranks validate slightly
    different models and the all-reduced validation top-1 is not the saved model's.
    """
    if not info.distributed:
        return
    for buffer in module.buffers():
        if not buffer.is_floating_point():
            continue  # num_batches_tracked: not used in eval mode
        comm = buffer.data if info.backend == "gloo" else buffer.data.to(info.device)
        dist.broadcast(comm, src)
        if comm is not buffer.data:
            buffer.data.copy_(comm)


def broadcast_object(obj: object, info: DistInfo, src: int = 0) -> object:
    """Send a picklable object from ``src`` to every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=info.device if info.backend == "nccl" else None)
    return box[0]
