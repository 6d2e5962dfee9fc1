"""``TiltSeries``: the images, their tilt angles and the acquisition facts, validated once."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import IcetideError

__all__ = ["InputStack", "TiltSeries"]


@dataclass
class TiltSeries:
    """A tilt series in icetide's conventions (docs/CONVENTIONS.md).

    ``images``: float32 ``(n_tilts, ny, nx)`` in stack order; ``tilt_angles_deg``: ``(n_tilts,)``;
    ``pixel_size_A``: Angstrom per pixel (``None`` if unknown); ``tilt_axis_angle_deg``: the tilt axis'
    direction on the images, counter-clockwise from the image Y axis (0 when the axis is vertical);
    ``defocus_A``: per-tilt defocus on the tilt axis, ``(n_tilts, 3)`` rows ``(defocus_u, defocus_v,
    astigmatism_angle_deg)`` in Angstrom (positive = underfocus; a ``(n_tilts,)`` array means no astigmatism),
    or ``None``; ``pre_exposure_e_per_A2``: ``(n_tilts,)`` exposure accumulated before each tilt, or ``None``;
    ``half_images``: with two half series (odd and even frame sums of the same acquisition), the second one,
    ``images`` the first, both normalised to the full exposure (their mean is the whole series), or ``None``.
    Construction validates everything and raises :class:`IcetideError` with a one-line message.
    """

    images: np.ndarray
    tilt_angles_deg: np.ndarray
    pixel_size_A: float | None = None
    tilt_axis_angle_deg: float = 0.0
    defocus_A: np.ndarray | None = None
    pre_exposure_e_per_A2: np.ndarray | None = None
    half_images: np.ndarray | None = None

    def __post_init__(self) -> None:
        images = np.asarray(self.images)
        if images.ndim == 2:
            raise IcetideError(f"expected a stack of tilt images (n_tilts, ny, nx), got a single 2-D image {images.shape}")
        if images.ndim != 3:
            raise IcetideError(f"expected a stack of tilt images (n_tilts, ny, nx), got shape {images.shape}")
        if min(images.shape) < 2:
            raise IcetideError(f"tilt series too small: shape {images.shape}")
        self.images = images.astype(np.float32, copy=False)
        angles = np.asarray(self.tilt_angles_deg, dtype=np.float64).reshape(-1)
        if angles.shape[0] != images.shape[0]:
            raise IcetideError(f"{angles.shape[0]} tilt angles for {images.shape[0]} images")
        if not np.all(np.isfinite(angles)):
            raise IcetideError("tilt angles contain NaN or Inf")
        if np.any(np.abs(angles) >= 90):
            raise IcetideError(f"tilt angles must lie in (-90, 90) degrees, got {angles.min():g} to {angles.max():g}")
        values, counts = np.unique(np.round(angles, 6), return_counts=True)
        if np.any(counts > 1):
            raise IcetideError(f"duplicated tilt angle(s): {', '.join(f'{v:g}' for v in values[counts > 1])}")
        self.tilt_angles_deg = angles
        if self.pixel_size_A is not None:
            self.pixel_size_A = float(self.pixel_size_A)
            if not np.isfinite(self.pixel_size_A) or self.pixel_size_A <= 0:
                raise IcetideError(f"pixel size must be positive, got {self.pixel_size_A}")
        self.tilt_axis_angle_deg = float(self.tilt_axis_angle_deg)
        self._check_optics(images.shape[0])
        if self.half_images is not None:
            half = np.asarray(self.half_images, dtype=np.float32)
            if half.shape != images.shape:
                raise IcetideError(f"the second half series has shape {half.shape}, the first {images.shape}")
            if not np.all(np.isfinite(half)):
                raise IcetideError("non-finite pixels (NaN/Inf) in the second half series")
            self.half_images = half
        bad = ~np.isfinite(self.images).reshape(images.shape[0], -1).all(axis=1)
        if bad.any():
            raise IcetideError(
                f"non-finite pixels (NaN/Inf) in tilt(s) {', '.join(map(str, np.flatnonzero(bad)))}"
            )
        flat = self.images.reshape(images.shape[0], -1)
        const = flat.max(axis=1) == flat.min(axis=1)
        if const.any():
            raise IcetideError(f"constant image(s) in tilt(s) {', '.join(map(str, np.flatnonzero(const)))}")

    def _check_optics(self, n_tilts: int) -> None:
        if self.defocus_A is not None:
            table = np.asarray(self.defocus_A, dtype=np.float64)
            if table.ndim == 1:
                table = np.stack([table, table, np.zeros_like(table)], axis=1)
            if table.ndim != 2 or table.shape != (n_tilts, 3):
                raise IcetideError(f"defocus for {table.shape[0]} views, the series has {n_tilts}")
            if not np.all(np.isfinite(table)) or np.any(table[:, :2] <= 0):
                raise IcetideError("defocus values must be finite underfocus (positive Angstrom)")
            self.defocus_A = table
        if self.pre_exposure_e_per_A2 is not None:
            dose = np.asarray(self.pre_exposure_e_per_A2, dtype=np.float64).reshape(-1)
            if dose.shape[0] != n_tilts:
                raise IcetideError(f"pre-exposure for {dose.shape[0]} views, the series has {n_tilts}")
            if not np.all(np.isfinite(dose)) or np.any(dose < 0):
                raise IcetideError("pre-exposure values must be finite and non-negative (e/A^2)")
            self.pre_exposure_e_per_A2 = dose

    def whole(self) -> np.ndarray:
        """The whole series: ``images``, or with two half series their mean ``(n_tilts, ny, nx)``."""
        return self.images if self.half_images is None else 0.5 * (self.images + self.half_images)

    @property
    def n_tilts(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """Detector shape ``(ny, nx)``."""
        return self.images.shape[1], self.images.shape[2]

    def quarter_turned(self, k: int) -> "TiltSeries":
        """The series with every image turned by ``k`` quarter turns (``np.rot90(image, k)``: ``(ny, nx)`` becomes
        ``(nx, ny)`` for odd ``k``) and the tilt axis with them (``tilt_axis_angle_deg - 90 k``). ``k`` 0 returns
        the series itself."""
        k = (int(k) + 1) % 4 - 1  # -1, 0, 1 or 2: the smallest turn
        if k == 0:
            return self

        def turn(stack: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(np.rot90(stack, k, axes=(1, 2)))

        return TiltSeries(
            turn(self.images), self.tilt_angles_deg, self.pixel_size_A, self.tilt_axis_angle_deg - 90.0 * k,
            self.defocus_A, self.pre_exposure_e_per_A2, None if self.half_images is None else turn(self.half_images),
        )

    def binned(self, factor: int) -> "TiltSeries":
        """The series binned by ``factor``: each image cut to a multiple of ``factor`` per axis (the remainder
        split between both edges) and averaged over ``factor x factor`` blocks (as IMOD's ``newstack -bin``);
        the pixel size multiplied by ``factor``. Binned pixel ``k`` is centred on its block, so centred
        coordinates scale by ``factor`` (to within half an input pixel when an axis was cut by an odd number).
        ``factor`` 1 returns the series itself."""
        factor = int(factor)
        if factor < 1:
            raise IcetideError(f"binning must be a positive integer, got {factor}")
        if factor == 1:
            return self
        ny, nx = self.shape
        if min(ny, nx) // factor < 8:
            raise IcetideError(f"binning {ny} x {nx} images by {factor} leaves fewer than 8 pixels per side")

        def bin_stack(stack: np.ndarray) -> np.ndarray:
            my, mx = ny // factor, nx // factor
            y0, x0 = (ny - my * factor) // 2, (nx - mx * factor) // 2
            cut = np.asarray(stack)[:, y0 : y0 + my * factor, x0 : x0 + mx * factor]
            blocks = cut.reshape(len(cut), my, factor, mx, factor)  # a view: no float64 copy of the stack
            return blocks.mean(axis=(2, 4), dtype=np.float64).astype(np.float32)

        return TiltSeries(
            bin_stack(self.images), self.tilt_angles_deg, None if self.pixel_size_A is None else self.pixel_size_A * factor,
            self.tilt_axis_angle_deg, self.defocus_A, self.pre_exposure_e_per_A2,
            None if self.half_images is None else bin_stack(self.half_images),
        )


@dataclass(frozen=True)
class InputStack:
    """What a :class:`TiltSeries` holds of the stack it was read from, for outputs that describe that stack.

    ``tilt_angles_deg`` ``(N,)``: every view's tilt angle, stack order; ``kept`` ``(M,)``: the increasing 0-based
    stack indices of the series' views (the others were excluded); ``inverted``: the series' images are the
    stack's negatives (``--invert``); ``image_names`` ``(N,)``: where the views are files of their own (a RELION-5
    project's micrographs), each view's file, stack order; ``None`` for the slices of one stack file.
    """

    tilt_angles_deg: np.ndarray
    kept: np.ndarray
    inverted: bool = False
    image_names: tuple[str, ...] | None = None

    @property
    def excluded(self) -> np.ndarray:
        """The 0-based stack indices left out, increasing."""
        return np.setdiff1d(np.arange(len(self.tilt_angles_deg)), self.kept)

    @classmethod
    def whole(cls, series: TiltSeries) -> "InputStack":
        """A series that is its whole stack, as read."""
        return cls(series.tilt_angles_deg, np.arange(series.n_tilts))


def replace_nonfinite(images: np.ndarray) -> tuple[np.ndarray, int]:
    """Copy of ``images (M, ny, nx)`` with NaN/Inf pixels set to the median of their image's finite pixels.

    Returns ``(images, n_replaced)``. An image with no finite pixel raises :class:`IcetideError`.
    """
    out = np.array(images, dtype=np.float32)
    bad = ~np.isfinite(out)
    for k in np.flatnonzero(bad.reshape(len(out), -1).any(axis=1)):
        finite = out[k][~bad[k]]
        if finite.size == 0:
            raise IcetideError(f"tilt {k} has no finite pixel")
        out[k][bad[k]] = np.median(finite)
    return out, int(bad.sum())

