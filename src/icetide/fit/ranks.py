"""What the ranks of a data-parallel fit (torch.distributed) exchange: the gradients and loss sums of a step, the
held-out loss, and the decision to stop. Each function is a no-op in one process (``world`` 1)."""

from __future__ import annotations

import torch

__all__ = ["all_reduce_gradients", "any_rank", "summed_mean"]


def all_reduce_gradients(
    params: list[torch.Tensor], total: torch.Tensor, count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the gradients of ``params``, the data-term sum ``total`` and the pixel count ``count`` over every rank
    (one all-reduce); returns the summed ``total`` and ``count``."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [total.reshape(1), count.to(total.dtype).reshape(1)])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset: offset + g.numel()].view_as(p).clone()
        offset += g.numel()
    return flat[-2], flat[-1].round().long()


def summed_mean(total: torch.Tensor, count: torch.Tensor, world: int) -> float:
    """``total / count`` (0 pixels: the total) of a loss sum and pixel count (float64 device scalars), both
    summed over every rank first."""
    if world > 1:
        import torch.distributed as dist

        both = torch.stack([total, count])
        dist.all_reduce(both)
        total, count = both[0], both[1]
    return float(total) / max(float(count), 1.0)


def any_rank(out_of_time: bool, signum: int, device: torch.device, world: int) -> tuple[bool, int]:
    """Whether any rank ran out of time, and the largest signal any rank received: every rank must stop at the
    same epoch."""
    if world == 1:
        return out_of_time, signum
    import torch.distributed as dist

    flags = torch.tensor([float(out_of_time), float(signum)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags[0]), int(flags[1])
