"""The implicit volume: hash encoding + MLP, a density field over the specimen box (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import copy
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import VolumeSettings
from ..geometry import box_to_unit
from .encoding import HashEncoding, Kernel
from .mlp import MLP

__all__ = ["ImplicitVolume", "EVALUATION_PIECE_VOXELS"]

# Voxels per piece when a lattice band is evaluated without gradients (validation, sampling): bounds the
# transient activations.
EVALUATION_PIECE_VOXELS = 2**20


class ImplicitVolume(nn.Module):
    """Density ``rho(x, y, z)`` over a box of shape ``box_shape_zyx`` (voxel coordinates, docs/CONVENTIONS.md).

    Points outside the box get the network's value at the nearest point of the box (the encoding clamps its
    unit coordinates), i.e. the field continues its faces outwards; renderers mask what lies outside.

    Execution (not part of the model; see :meth:`set_execution`): the encoding's kernel choice, and mixed
    precision on CUDA (table reads in fp16, the MLP in bf16 under autocast; parameters, gradients and the
    returned densities stay fp32).
    """

    def __init__(self, box_shape_zyx: tuple[int, int, int], config: VolumeSettings | None = None):
        super().__init__()
        config = config or VolumeSettings()
        self.config = config
        self.box_shape_zyx = tuple(int(n) for n in box_shape_zyx)
        self.encoding = HashEncoding(**config.encoding_args(), box_shape_zyx=self.box_shape_zyx)
        self.mlp = MLP(self.encoding.output_dim, config.hidden, config.n_hidden_layers)
        self.mixed_precision = False
        # Per-level weights of the encoding's features (coarse-to-fine schedules); None: all 1.
        self.level_weights: torch.Tensor | None = None

    def set_execution(self, kernel: Kernel = "auto", mixed_precision: bool = False) -> "ImplicitVolume":
        """Choose the encoding's kernel (``auto``, ``triton``, ``numba`` or ``torch``, see :class:`HashEncoding`) and
        mixed precision (CUDA only: fp16 table reads, bf16 MLP). Returns ``self``."""
        self.encoding.set_kernel(kernel, torch.float16 if mixed_precision else torch.float32)
        self.encoding.kernel_for(self.encoding.table.device)  # raises if the kernel asked for cannot run there
        self.mixed_precision = mixed_precision
        return self

    def _density(self, features: torch.Tensor, channels_first: bool = False) -> torch.Tensor:
        """The MLP's output float32 for encoded ``features``: ``(...)`` for ``(..., L * F)``, or for
        ``(L * F, ...)`` with ``channels_first`` (a lattice's features)."""
        scale = None
        if self.level_weights is not None:
            scale = self.level_weights.repeat_interleave(self.encoding.n_features)
        mlp = self.mlp.forward_channels_first if channels_first else self.mlp
        channel = 0 if channels_first else -1
        if self.mixed_precision and features.is_cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = mlp(features, scale)
            return out.squeeze(channel).float()
        return mlp(features, scale).squeeze(channel)

    @classmethod
    def from_config(cls, config: VolumeSettings, box_shape_zyx: tuple[int, int, int]) -> "ImplicitVolume":
        """A freshly initialised volume of this configuration over the box ``box_shape_zyx``."""
        return cls(box_shape_zyx, config)

    def extra_repr(self) -> str:
        return f"box_shape_zyx={self.box_shape_zyx}, config={self.config.model_dump()}"

    def forward(self, xyz_vox: torch.Tensor) -> torch.Tensor:
        """Density at points ``(N, 3)`` (voxel coordinates ``(x, y, z)``, box centre at 0); returns ``(N,)``."""
        unit = box_to_unit(xyz_vox, self.box_shape_zyx)
        return self._density(self.encoding(unit))

    def lattice(
        self,
        offset_vox: torch.Tensor,
        rows: slice | None = None,
        recompute_voxels: int | None = None,
        step: int = 1,
    ) -> torch.Tensor:
        """Density at every voxel centre + ``offset_vox`` (``(3,)``, ``(x, y, z)``, voxels) of the box.

        ``step``: every ``step``-th voxel instead, the lattice of ``n // step`` points per axis, ``step`` voxels
        apart and centred on the box (the voxels of the box binned by ``step``, cropped to a multiple);
        ``offset_vox`` and ``rows`` are then in its units. ``rows``: a band ``start:stop`` of y indices (all rows
        if None). Returns ``(nz, n_rows, nx)`` of the lattice; differentiable with respect to the parameters (and
        the offset).

        ``recompute_voxels``: evaluate the band in pieces of whole rows of about this many voxels (at least one
        ``nz x nx`` plane) whose encodings and MLP activations are not kept for the backward pass but recomputed
        there, one piece at a time (activation checkpointing): the band then keeps its densities (4 bytes per
        voxel) instead of its activations (about ``4 (6 L F + hidden x layers)`` bytes, see
        :func:`icetide.fit.field_bytes_per_point`), for one more forward pass. Same values and gradients.
        Without gradients the band is always evaluated in pieces (of ``recompute_voxels``, default
        ``EVALUATION_PIECE_VOXELS``), which bounds the memory of the transient activations at no cost.
        """
        if step < 1:
            raise ValueError(f"step must be a positive number of voxels, not {step}")
        nz, ny, nx = (n // step for n in self.box_shape_zyx)
        start, stop, _ = (rows or slice(None)).indices(ny)
        grad = torch.is_grad_enabled()
        if grad and recompute_voxels is None:
            return self._lattice_band(offset_vox, slice(start, stop), step)
        rows_per_piece = max(1, (recompute_voxels or EVALUATION_PIECE_VOXELS) // (nz * nx))
        bands = [slice(r, min(r + rows_per_piece, stop)) for r in range(start, stop, rows_per_piece)]
        if grad:  # nothing random inside; saving the RNG state could wait on a GPU
            pieces = [checkpoint(self._lattice_band, offset_vox, band, step, use_reentrant=False,
                                 preserve_rng_state=False) for band in bands]
        else:
            pieces = [self._lattice_band(offset_vox, band, step) for band in bands]
        return torch.cat(pieces, 1) if len(pieces) > 1 else pieces[0]

    def _lattice_band(self, offset_vox: torch.Tensor, rows: slice, step: int) -> torch.Tensor:
        shape = tuple(n // step for n in self.box_shape_zyx)
        features = self.encoding.forward_lattice(shape, offset_vox, rows, spacing_vox=step)
        return self._density(features, channels_first=True)

    @torch.no_grad()
    def sample_grid(
        self,
        shape_zyx: tuple[int, int, int] | None = None,
        chunk_voxels: int = EVALUATION_PIECE_VOXELS,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """The density at the voxel centres of a grid of shape ``shape_zyx`` spanning the box (default: the box).

        Evaluated in bands of whole rows of about ``chunk_voxels`` voxels (at least one ``nz x nx`` plane), on
        ``device`` (default: where the parameters are; the module itself stays put). Returns a CPU float32
        tensor ``(nz, ny, nx)``.
        """
        nz, ny, nx = shape_zyx or self.box_shape_zyx
        module = self
        if device is not None and torch.device(device) != self.encoding.table.device:
            module = copy.deepcopy(self).to(device)
        encoding, table = module.encoding, module.encoding.table
        offset = torch.zeros(3, dtype=table.dtype, device=table.device)
        rows_per_band = max(1, chunk_voxels // (nz * nx))
        out = torch.empty(nz, ny, nx, dtype=torch.float32)
        for start in range(0, ny, rows_per_band):
            band = slice(start, min(start + rows_per_band, ny))
            features = encoding.forward_lattice((nz, ny, nx), offset, band)
            out[:, band] = module._density(features, channels_first=True).float().cpu()
        return out
