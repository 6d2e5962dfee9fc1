"""The forward model: predicted pixel values of observed tilt images (paper eq. 1).

Both renderers take the *ideal-projection coordinates* ``x' = R(alpha)(x + phi(x)) - tau`` of the observed
pixels (from :func:`icetide.deform.deform_coords`) and return ``P_theta[rho](x')`` divided by the slab thickness
(so a field of order one predicts data normalised to order one):

- :class:`RaysRenderer` (the paper's): cast the ray of every ``x'``, sample it inside the specimen slab only
  (stratified samples with per-ray jitter) and integrate. Gradients reach the deformations through the
  sample positions.
- :class:`LatticeRenderer`: evaluate the field once on the voxel lattice (shifted by a random sub-voxel offset
  each call) for a band of rows, project the band for the batch of tilts with the explicit projector of
  :mod:`icetide.classical`, and sample the 2-D projections at ``x'`` (bilinear). Same model up to interpolation,
  with one field evaluation per voxel instead of one per ray sample.

Both return ``(values (B, P), valid (B, P))``; ``valid`` is false where the model cannot predict the pixel
(outside the rendered band or the projected box) and those pixels must not enter the loss.

Both offer the same interface to the fit (:mod:`icetide.fit`): besides ``render``, how an epoch is cut into
steps (:meth:`epoch_bands`, :meth:`row_pieces`), which pixels a step predicts (:meth:`random_pixels`,
:meth:`held_out_pixels`), how a step is shared between ranks (:meth:`share`), the field evaluations of a step
(:meth:`evaluations_per_step`), and three capabilities (``bins``, ``predicts_whole_rows``,
``recomputes_activations``); the fit never asks which renderer it holds.
"""

from __future__ import annotations

import math

import torch

from .deform import sample_images
from .geometry import ray_points, slab_ray_interval
from .classical import project

__all__ = ["LatticeRenderer", "RaysRenderer", "RENDERERS", "make_renderer"]


def _on(tilt_angles_rad, like: torch.Tensor) -> torch.Tensor:
    """Angles as a tensor of ``like``'s dtype on its device (host angles copied without waiting)."""
    return torch.as_tensor(tilt_angles_rad).to(like.device, like.dtype, non_blocking=True)


def _inside(coords: torch.Tensor, n_rows: int, nx: int, margin: float = 0.5) -> torch.Tensor:
    """Whether centred coordinates ``(..., 2)`` lie inside an ``n_rows x nx`` image (minus ``margin``)."""
    u, v = coords[..., 0], coords[..., 1]
    return (u.abs() <= (nx - 1) / 2 - margin) & (v.abs() <= (n_rows - 1) / 2 - margin)


class LatticeRenderer:
    """Lattice evaluation + explicit projection + 2-D resampling at the deformed coordinates."""

    # Renders the series binned by 2 from every other voxel (the fit's binned stage).
    bins = True
    # A step predicts every pixel of the rows it renders: the held-out pixels can be scored in the training
    # steps, whole images can be filtered (the CTF forward model), and ranks can split the rows.
    predicts_whole_rows = True
    # The lattice's activations can be recomputed in the backward pass (fit.recompute_field).
    recomputes_activations = True

    def __init__(
        self,
        volume_shape_zyx: tuple[int, int, int],
        band_rows: int | None = None,
        detector_nx: int | None = None,
        recompute_voxels: int | None = None,
        step: int = 1,
    ):
        """``volume_shape_zyx``: the lattice's shape; with ``step`` > 1 the field's box binned by ``step`` (the
        lattice of every ``step``-th voxel, :meth:`ImplicitVolume.lattice`), and then coordinates, rows and
        ``detector_nx`` are in binned pixels too."""
        self.shape = volume_shape_zyx
        self.step = step
        # Pieces of the band whose activations the backward pass recomputes (ImplicitVolume.lattice); None: keep.
        self.recompute_voxels = recompute_voxels
        nz, ny, nx = volume_shape_zyx
        self.band_rows = ny if band_rows is None else min(band_rows, ny)
        # A volume wider than the detector (a laterally unbounded slab) projects onto the central columns.
        self.detector_nx = nx if detector_nx is None else int(detector_nx)

    def band(self, generator: torch.Generator | None) -> slice:
        """A random band of rows (all rows when the band covers the volume)."""
        ny = self.shape[1]
        if self.band_rows >= ny:
            return slice(0, ny)
        r0 = int(torch.randint(0, ny - self.band_rows + 1, (1,), generator=generator))
        return slice(r0, r0 + self.band_rows)

    def render(
        self,
        field,
        coords: torch.Tensor,
        tilt_angles_rad: torch.Tensor,
        generator: torch.Generator | None = None,
        jitter: bool = True,
        rows: slice | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``coords (B, P, 2)`` ideal-projection coordinates, ``tilt_angles_rad (B,)`` -> ``(B, P)`` values, mask;
        ``rows``: the band of lattice rows to render (default a random band of ``band_rows``).

        Angles given on the host (a CPU tensor) keep the call free of host synchronisations on CUDA."""
        nz, ny, nx = self.shape
        rows = self.band(generator) if rows is None else rows
        if jitter:
            offset = torch.rand(3, generator=generator).to(coords.device, non_blocking=True) - 0.5
        else:
            offset = torch.zeros(3, device=coords.device)
        extra = {} if self.recompute_voxels is None else {"recompute_voxels": self.recompute_voxels}
        if self.step != 1:
            extra["step"] = self.step
        lattice = field.lattice(offset, rows=rows, **extra)  # (nz, n_rows, nx), the field at centres + offset
        proj = project(lattice, tilt_angles_rad, self.detector_nx)  # (B, n_rows, detector_nx)
        n_rows = rows.stop - rows.start
        # The lattice holds f(p + offset): its projection at w is P[f](w + projected offset). Move the
        # coordinates into the band's own centred frame as well.
        theta = _on(tilt_angles_rad, coords)
        c, s = torch.cos(theta), torch.sin(theta)
        band_centre_v = (rows.start + rows.stop - 1) / 2 - (ny - 1) / 2
        du = offset[0] * c + offset[2] * s
        dv = offset[1] + band_centre_v
        local = coords - torch.stack([du, dv.expand_as(du)], -1)[:, None, :]
        valid = _inside(local, n_rows, self.detector_nx)
        values = sample_images(proj, local[:, None], mode="bilinear")[:, 0]
        return values / nz, valid

    def epoch_bands(
        self, lo: int, hi: int, band_rows: int, least: int, one_step: bool, generator: torch.Generator
    ) -> list[list[slice] | None]:
        """The rows of each step of an epoch over the rows ``lo:hi``: ``[None]`` (every row in one step) or bands.

        The rows are cut into ``n`` bands of equal height, one optimiser step each: at least ``least``, and as
        many as bands of at most ``band_rows`` rows need unless ``one_step`` (under torch.distributed a rank's
        rows beyond its memory are pieces of one step, :meth:`row_pieces`). The band edges are shifted by a
        random fraction of a band, so that band edges, where warped pixels fall outside the band and are not
        scored, move from epoch to epoch; the two partial end pieces form one step together. The steps come in
        random order; together they cover every row once.
        """
        needed = 1 if one_step else math.ceil((hi - lo) / band_rows)
        n = min(hi - lo, max(least, needed))
        if n <= 1:
            return [None]
        shift = float(torch.rand((), generator=generator))
        edges = [lo + round((i + shift) * (hi - lo) / n) for i in range(n)]
        steps = [[slice(a, b)] for a, b in zip(edges[:-1], edges[1:])]
        steps.append([band for band in (slice(lo, edges[0]), slice(edges[-1], hi)) if band.stop > band.start])
        return [steps[i] for i in torch.randperm(len(steps), generator=generator).tolist()]

    def row_pieces(self, bands: list[slice] | None, n_rows: int, band_rows: int) -> list[slice | None]:
        """``bands`` (None: all ``n_rows`` rows) cut into pieces of at most ``band_rows`` rows, rendered one after
        another within a step."""
        return [slice(r, min(r + band_rows, band.stop))
                for band in (bands or [slice(0, n_rows)]) for r in range(band.start, band.stop, band_rows)]

    def random_pixels(self, n_pixels: int, n_tilts: int, per_tilt: int, generator: torch.Generator) -> None:
        """Which pixels a training step predicts: every pixel of its rows (None)."""
        return None

    def held_out_pixels(self, held_out: torch.Tensor) -> None:
        """Which pixels a validation pass predicts: every pixel of its rows (None)."""
        return None

    def share(self, tilts: torch.Tensor, rank: int, world: int, rank_rows: slice | None):
        """This rank's part of a step: every tilt, in its band of rows ``rank_rows``."""
        return tilts, rank_rows

    def evaluations_per_step(self, band_rows: int, tilts_per_step: int, rays_per_tilt: int,
                             largest_tilt_rad: float) -> int:
        """Field evaluations of a training step: the lattice of a band of ``band_rows`` rows."""
        nz, ny, nx = self.shape
        return nz * min(band_rows, ny) * nx

    def tilt_groups(self, step_bytes: int | None, point_bytes: int, tilts_per_step: int, rays_per_tilt: int,
                    largest_tilt_rad: float) -> int:
        """In how many groups the tilts of a step are rendered: one; the band's rows set a step's memory."""
        return 1


class RaysRenderer:
    """The paper's ray sampler, restricted to the specimen slab."""

    bins = False
    predicts_whole_rows = False
    recomputes_activations = False

    def __init__(self, volume_shape_zyx: tuple[int, int, int], samples_per_voxel: float = 1.0):
        self.shape = volume_shape_zyx
        self.samples_per_voxel = samples_per_voxel

    def n_samples(self, tilt_angles_rad: torch.Tensor) -> int:
        """Samples per ray: enough for the longest path through the slab at this batch's largest tilt."""
        nz = self.shape[0]
        longest = nz / float(torch.cos(torch.as_tensor(tilt_angles_rad).abs().max()))
        return max(2, math.ceil(longest * self.samples_per_voxel))

    def render(
        self,
        field,
        coords: torch.Tensor,
        tilt_angles_rad: torch.Tensor,
        generator: torch.Generator | None = None,
        jitter: bool = True,
        rows: None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``coords (B, P, 2)``, ``tilt_angles_rad (B,)`` -> line integrals / thickness ``(B, P)``, mask. Every
        ray is cast whole: ``rows`` (the lattice's bands) must be None.

        Angles given on the host (a CPU tensor) keep the call free of host synchronisations on CUDA."""
        nz, ny, nx = self.shape
        b, p, _ = coords.shape
        k = self.n_samples(tilt_angles_rad)
        theta = _on(tilt_angles_rad, coords)[:, None, None]
        u, v = coords[..., 0, None], coords[..., 1, None]  # (B, P, 1)
        t0, t1 = slab_ray_interval(u, theta, float(nz))
        if jitter:
            frac = torch.rand(b, p, k, generator=generator).to(coords.device, non_blocking=True)
        else:
            frac = torch.full((b, p, k), 0.5, device=coords.device)
        steps = (torch.arange(k, device=coords.device) + frac) / k  # stratified in [0, 1)
        dt = (t1 - t0) / k  # (B, P, 1)
        points = ray_points(u, v, theta, t0 + steps * (t1 - t0))  # (B, P, K, 3)
        # Density is zero outside the box (which is wider than the detector for a laterally unbounded slab).
        x, y, z = points.abs().unbind(-1)
        inside = (x <= nx / 2) & (y <= ny / 2) & (z <= nz / 2)
        density = field(points.reshape(-1, 3)).reshape(b, p, k) * inside
        values = (density * dt).sum(-1) / nz
        valid = (v[..., 0].abs() <= (ny - 1) / 2) & (u[..., 0].abs() <= (nx - 1) / 2)
        return values, valid

    def epoch_bands(
        self, lo: int, hi: int, band_rows: int, least: int, one_step: bool, generator: torch.Generator
    ) -> list[None]:
        """Every step samples rays over the whole detector: one "band" per step."""
        return [None]

    def row_pieces(self, bands: None, n_rows: int, band_rows: int) -> list[None]:
        return [None]

    def random_pixels(self, n_pixels: int, n_tilts: int, per_tilt: int, generator: torch.Generator) -> torch.Tensor:
        """Which pixels a training step predicts: ``(n_tilts, min(per_tilt, n_pixels))`` random pixel indices of
        each tilt (``fit.rays_per_tilt``)."""
        n = min(per_tilt, n_pixels)
        return torch.stack([torch.randperm(n_pixels, generator=generator)[:n] for _ in range(n_tilts)])

    def held_out_pixels(self, held_out: torch.Tensor) -> torch.Tensor:
        """Which pixels a validation pass predicts: the first held-out pixels of each tilt of ``held_out (B, P)``,
        as many as the tilt with the fewest has, ``(B, n)``."""
        n = int(held_out.sum(1).min())
        return torch.stack([torch.nonzero(row)[:n, 0] for row in held_out])

    def share(self, tilts: torch.Tensor, rank: int, world: int, rank_rows: slice | None):
        """This rank's part of a step: its share of the tilts, every row."""
        return tilts.tensor_split(world)[rank], None

    def evaluations_per_step(self, band_rows: int, tilts_per_step: int, rays_per_tilt: int,
                             largest_tilt_rad: float) -> int:
        """Field evaluations of a training step: the samples of every ray of ``tilts_per_step`` tilts."""
        return tilts_per_step * rays_per_tilt * self.n_samples(torch.tensor(largest_tilt_rad))

    def tilt_groups(self, step_bytes: int | None, point_bytes: int, tilts_per_step: int, rays_per_tilt: int,
                    largest_tilt_rad: float) -> int:
        """In how many groups the tilts of a step are rendered (gradients accumulated: the same step, less
        memory) so that each group's field evaluations, ``point_bytes`` each, fit ``step_bytes`` (None: one)."""
        if step_bytes is None:
            return 1
        points = self.evaluations_per_step(0, tilts_per_step, rays_per_tilt, largest_tilt_rad) * point_bytes
        return int(min(tilts_per_step, max(1, math.ceil(points / max(step_bytes, 1)))))


RENDERERS = {"lattice": LatticeRenderer, "rays": RaysRenderer}


def make_renderer(
    name: str,
    volume_shape_zyx: tuple[int, int, int],
    *,
    band_rows: int | None = None,
    samples_per_voxel: float = 1.0,
    detector_nx: int | None = None,
    recompute_voxels: int | None = None,
    step: int = 1,
) -> LatticeRenderer | RaysRenderer:
    """The renderer called ``name`` (``"lattice"`` or ``"rays"``); ``detector_nx``: detector width when the
    volume is wider (default: the volume's); ``band_rows``, ``recompute_voxels``, ``step``: see
    :class:`LatticeRenderer`; ``samples_per_voxel``: see :class:`RaysRenderer`. Each takes what applies to it."""
    if name == "lattice":
        return LatticeRenderer(volume_shape_zyx, band_rows, detector_nx, recompute_voxels, step)
    if name == "rays":
        return RaysRenderer(volume_shape_zyx, samples_per_voxel)
    raise ValueError(f"unknown renderer {name!r}")
