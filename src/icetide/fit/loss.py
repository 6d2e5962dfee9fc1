"""The data term of each pixel (``fit.loss``)."""

from __future__ import annotations

import torch

__all__ = ["POISSON_SHARPNESS", "pixel_loss"]

# Sharpness of the softplus that keeps the predicted counts of the Poisson deviance positive (in units of the
# data's spread): mu = softplus(k v) / k equals v beyond a few 1/k and still passes a gradient below 0, where a
# clamp would freeze the pixels a fresh, near-zero volume predicts as negative.
POISSON_SHARPNESS = 10.0


def pixel_loss(values: torch.Tensor, obs: torch.Tensor, loss: str) -> torch.Tensor:
    """The data term of each pixel: ``|values - obs|`` (l1), ``(values - obs)^2`` (l2), or the Poisson deviance
    (halved) ``mu - obs - obs log(mu / obs)`` with ``mu = softplus(k values) / k`` (``k`` =
    ``POISSON_SHARPNESS``) and ``0 log 0 = 0`` (poisson: zero where ``mu = obs``, positive elsewhere; its
    minimiser over ``mu`` is the Poisson maximum likelihood, and it is invariant, up to a factor, to the scale
    the data were divided by)."""
    if loss == "l1":
        return (values - obs).abs()
    if loss == "l2":
        return (values - obs).square()
    mu = torch.nn.functional.softplus(values, beta=POISSON_SHARPNESS)
    counts = obs.clamp(min=0)
    return mu - counts - torch.xlogy(counts, mu) + torch.xlogy(counts, counts)
