"""Where the work runs: the device, and the process's place in a ``torch.distributed`` run (``torchrun``).

The device is chosen once, from a name (:func:`resolve_device`); a run launched by ``torchrun`` joins its process
group once (:func:`init_distributed`); everything else asks :func:`distributed_rank`.
"""

from __future__ import annotations

import os

import torch

from .errors import IcetideError

__all__ = ["distributed_rank", "init_distributed", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise IcetideError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise IcetideError(f"device {name!r} requested but CUDA is not available")
    return dev


def distributed_rank() -> tuple[int, int]:
    """``(rank, world size)`` of this process in an initialised ``torch.distributed`` group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str | None) -> tuple[int, str | None]:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1): NCCL with one GPU per rank
    (``LOCAL_RANK``), else gloo on the CPU. Returns ``(rank, device for this rank)``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, device
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and device in (None, "auto", "cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return dist.get_rank(), device if cuda else (device or "cpu")
