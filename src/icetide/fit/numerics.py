"""The guard against non-finite steps, checked on the device (no host synchronisation per step)."""

from __future__ import annotations

import torch

__all__ = ["NumericalFailure", "finite_or_zeroed"]


class NumericalFailure(Exception):
    """A non-finite step with no rollback left; the message is the stop reason's detail."""


def finite_or_zeroed(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """``(loss finite, gradients finite)`` of the step just back-propagated, as device booleans ``(2,)``; when
    either is not, every gradient of ``params`` is zeroed on the device, so the optimiser steps that follow keep
    the parameters finite until the epoch's end rolls the epoch back.

    Only non-finite values count: Adam moves each parameter by about its learning rate whatever the gradient's
    size, so a large finite gradient norm is no sign of divergence.
    """
    grads = [p.grad for p in params if p.grad is not None]
    finite = torch.stack([torch.isfinite(loss.detach()), torch.isfinite(torch.nn.utils.get_total_norm(grads))])
    bad = ~finite.all()
    for g in grads:
        g.masked_fill_(bad, 0.0)
    return finite
