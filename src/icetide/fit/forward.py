"""The forward model of the fit (paper eq. 1 with the deformations of eq. 2): the predicted value of observed
pixels, and their data term.

``c = g P_theta[rho](x') + b`` at ``x' = R(alpha)(x + phi(x)) - tau``: the deformations move the pixel centres
(:class:`DeformationModel`), the scale's renderer integrates the volume(s) along the tilt direction, the CTF of
the forward model (if any) filters whole images, and each tilt's gain ``g`` and offset ``b`` apply. With half
maps every pixel's value comes from the volume of its half.
"""

from __future__ import annotations

import math

import torch

from ..config import CtfSettings
from ..ctf import SeriesCtf
from ..data import TiltSeries
from ..errors import IcetideError
from ..volume import ImplicitVolume
from .deformation_model import DeformationModel
from .loss import pixel_loss
from .problem import Problem, SamplingScale

__all__ = ["ForwardModel", "forward_ctf"]


class ForwardModel:
    """Predicts pixels of ``problem``'s series from ``volumes`` (one, or two half volumes) and ``deformations``.
    ``sampler``: the random stream of the renderers' jitter and of the rays' pixels; ``loss``: ``fit.loss``;
    ``rays_per_tilt``: pixels per tilt of a rays step; ``ctf``: the forward model's CTF, or None."""

    def __init__(self, volumes: list[ImplicitVolume], deformations: DeformationModel, problem: Problem,
                 sampler: torch.Generator, loss: str, rays_per_tilt: int, ctf: SeriesCtf | None = None):
        self.volumes = volumes
        self.deformations = deformations
        self.problem = problem
        self.sampler = sampler
        self.loss = loss
        self.rays_per_tilt = rays_per_tilt
        self.ctf = ctf

    def on_device(self, tilts: torch.Tensor) -> torch.Tensor:
        """Host tilt indices as an index tensor on the fit's device, copied without waiting for the device."""
        return tilts.to(self.problem.device, non_blocking=True)

    def coords(self, scale: SamplingScale, tilts: torch.Tensor, pixel_rows: slice | None = None) -> torch.Tensor:
        """Ideal-projection coordinates ``(B, P, 2)`` of every pixel (or every pixel of the rows ``pixel_rows``)
        of ``tilts`` (host indices) at ``scale``, in its pixels."""
        v = scale.v_px if pixel_rows is None else scale.v_px[pixel_rows]
        return self.deformations.coords(scale.u_px, v, scale.factor, self.on_device(tilts))

    def predict(
        self, scale: SamplingScale, tilts: torch.Tensor, jitter: bool, rows: slice | None = None,
        reach_px: float = math.inf, held_out: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | slice | None]:
        """``(values, valid, pick)`` for the pixels ``pick`` of ``tilts`` (host indices) at ``scale``: with
        ``rows`` (a band of lattice rows), the detector rows that can see the band when no pixel moves further
        than ``reach_px`` (:meth:`SamplingScale.pixel_rows`); else the renderer's choice (random pixels in a
        training step with ``jitter``, the held-out pixels for ``held_out``; None: every pixel)."""
        if rows is not None:
            pick = scale.pixel_rows(rows, reach_px)
            whole = pick.start == 0 and pick.stop == scale.shape[0]
            values, valid = self.render(scale, self.coords(scale, tilts, pick), tilts, jitter, rows, whole)
        else:
            coords = self.coords(scale, tilts)
            renderer = scale.renderer
            if jitter:
                pick = renderer.random_pixels(coords.shape[1], len(tilts), self.rays_per_tilt, self.sampler)
            elif held_out:
                pick = renderer.held_out_pixels(scale.held_out[self.on_device(tilts)].reshape(len(tilts), -1))
            else:
                pick = None
            if pick is not None:
                pick = pick.to(self.problem.device, non_blocking=True)
                coords = torch.gather(coords, 1, pick[..., None].expand(-1, -1, 2))
            values, valid = self.render(scale, coords, tilts, jitter, whole=pick is None)
        return self.of_own_half(scale, values, tilts, pick), valid, pick

    def render(
        self, scale: SamplingScale, coords: torch.Tensor, tilts: torch.Tensor, jitter: bool,
        rows: slice | None = None, whole: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted values ``(V, B, P)`` of every volume (``V`` = 1, or 2 with half maps) at ``coords`` and the
        pixels valid for all of them ``(B, P)``. ``whole``: the pixels are every pixel of the tilts, in order (then
        the forward model's CTF, if any, applies)."""
        rendered = [scale.renderer.render(volume, coords, self.problem.theta_host[tilts], self.sampler,
                                          jitter=jitter, rows=rows)
                    for volume in self.volumes]
        values = torch.stack([v for v, _ in rendered])
        valid = rendered[0][1] if len(rendered) == 1 else rendered[0][1] & rendered[1][1]
        if self.ctf is not None:
            if not whole:
                raise IcetideError("the CTF forward model needs whole images; this step predicted part of them")
            shape = self.problem.detector_shape
            values = torch.stack([
                torch.stack([self.ctf(image.view(shape), int(m)).reshape(-1) for image, m in zip(per_volume, tilts)])
                for per_volume in values
            ])
        return self.deformations.apply_intensity(values, self.on_device(tilts)), valid

    def of_own_half(self, scale: SamplingScale, values: torch.Tensor, tilts: torch.Tensor, pick) -> torch.Tensor:
        """``values (V, B, P)`` -> ``(B, P)``: each pixel's value from its half's volume (the only one if V = 1);
        with two half series every pixel has a value in each, and ``values`` is returned as it is."""
        if len(values) == 1:
            return values[0]
        if scale.half_mask is None:
            return values
        return torch.where(scale.pixels(scale.half_mask, self.on_device(tilts), pick), values[1], values[0])

    def data_term(self, values: torch.Tensor, obs: torch.Tensor, tilts: torch.Tensor) -> torch.Tensor:
        """Per-pixel data term ``(B, P)`` (``fit.loss``) times each tilt's loss weight; with two half series
        (``values`` and ``obs`` ``(2, B, P)``), the mean of the two halves' terms."""
        loss = pixel_loss(values, obs, self.loss) * self.problem.tilt_weights[self.on_device(tilts), None]
        return loss.mean(0) if loss.dim() == 3 else loss


def forward_ctf(series: TiltSeries, settings: CtfSettings, scale: SamplingScale, world: int,
                tilt_axis_deg: float | None = None) -> SeriesCtf | None:
    """The CTF of the forward model (``ctf.correction: model`` with a known defocus), else None. It filters whole
    predicted images, so it needs a renderer that predicts whole rows with every row in one band of the unbinned
    ``scale``, in one process (``world`` 1). ``tilt_axis_deg``: the tilt axis on the images that orients the
    defocus gradient (default the series')."""
    if settings.correction != "model" or series.defocus_A is None:
        return None
    if series.pixel_size_A is None:
        raise IcetideError("the CTF forward model needs the pixel size (--pixel-size or the MRC header)")
    ny = scale.shape[0]
    if not scale.renderer.predicts_whole_rows or world > 1 or scale.lattice_rows < ny:
        raise IcetideError(
            "the CTF forward model filters whole images: it needs the lattice renderer, one process and every "
            f"row in one band (here {scale.lattice_rows} of {ny} rows fit); use phaseflip"
        )
    axis = series.tilt_axis_angle_deg if tilt_axis_deg is None else tilt_axis_deg
    return SeriesCtf(series.tilt_angles_deg, series.pixel_size_A, series.defocus_A, settings.microscope(),
                     axis, settings.defocus_hand, math.radians(settings.phase_tolerance_deg))
