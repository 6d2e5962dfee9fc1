"""The small fully connected network that turns encoded features into a density."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MLP"]

# Rows per chunk by device type. On CPU, layers applied to ~1e5-1e6 rows at once allocate activations of tens
# of MB that the C allocator maps afresh (and page-faults) on every call; chunks of this size avoid that.
_CHUNK_ROWS = {"cpu": 16384}


class MLP(nn.Sequential):
    """``in_features -> [hidden, ReLU] x n_hidden_layers -> out_features`` (linear output).

    Input ``(..., in_features)``, output ``(..., out_features)`` (:meth:`forward`), or channels first
    (:meth:`forward_channels_first`); PyTorch's default initialisation. On CPU the rows are evaluated in chunks
    (same result, faster; see ``_CHUNK_ROWS``). ``input_scale`` ``(in_features,)`` multiplies the input features
    (a coarse-to-fine schedule's level weights); it is applied to the first layer's weights, which is the same
    product without a scaled copy of the input.
    """

    def __init__(self, in_features: int, hidden: int = 32, n_hidden_layers: int = 2, out_features: int = 1):
        if in_features < 1 or hidden < 1 or n_hidden_layers < 1 or out_features < 1:
            raise ValueError("MLP sizes must be positive and n_hidden_layers >= 1")
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(n_hidden_layers):
            layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        layers.append(nn.Linear(width, out_features))
        super().__init__(*layers)

    def forward(self, x: torch.Tensor, input_scale: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = self._chunked(rows, 0, input_scale, F.linear)
        return out.view(*x.shape[:-1], out.shape[-1])

    def forward_channels_first(self, x: torch.Tensor, input_scale: torch.Tensor | None = None) -> torch.Tensor:
        """The network on channels-first input ``(in_features, ...)``: output ``(out_features, ...)``.

        Each layer is ``W @ h + b`` on columns, so a lattice's features (see
        :meth:`icetide.volume.HashEncoding.forward_lattice`) go in without a transposed copy."""
        columns = x.reshape(x.shape[0], -1)
        out = self._chunked(columns, 1, input_scale, lambda h, w, b: torch.addmm(b[:, None], w, h))
        return out.view(out.shape[0], *x.shape[1:])

    def _chunked(
        self,
        x: torch.Tensor,
        dim: int,
        input_scale: torch.Tensor | None,
        linear: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The layers on ``x``, whose samples run along ``dim``, in chunks on CPU; ``linear(h, weight, bias)``."""
        first = self[0].weight if input_scale is None else self[0].weight * input_scale

        def layers(h: torch.Tensor) -> torch.Tensor:
            for layer in self:
                if isinstance(layer, nn.Linear):
                    h = linear(h, first if layer is self[0] else layer.weight, layer.bias)
                else:
                    h = layer(h)
            return h

        chunk = _CHUNK_ROWS.get(x.device.type)
        if chunk is None or x.shape[dim] <= chunk:
            return layers(x)
        return torch.cat([layers(piece) for piece in x.split(chunk, dim)], dim)
