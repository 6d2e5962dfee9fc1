"""Figures of the evaluation (paper Figs. 4-7) and training curves.

Every function writes a PNG at ``path`` and, beside it (same name, ``.csv`` or ``.json``), the numbers
behind it: curves as CSV in long format, image figures as JSON (slice indices, display ranges, fields).
Figures are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas, so no global pyplot
state or display is touched. Each function returns ``(png_path, data_path)``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .deform import Deformations
from .io import atomic_path, write_json
from .metrics import FSC_THRESHOLDS, detector_mesh, local_field

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "plot_fsc",
    "plot_orthoslices",
    "plot_fourier_slices",
    "plot_local_fields",
    "plot_deformation_errors",
    "plot_curves",
    "plot_bars",
]

_DPI = 120
_PERCENTILES = (1.0, 99.0)


def _figure(width: float, height: float) -> Figure:
    """A new figure of ``width x height`` inches. matplotlib is imported here, when a figure is drawn, so that
    importing icetide (and starting its CLI) does not import it."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI)
    return path


def _write_csv(path: Path, header: Sequence[str], rows) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)
    return path


def plot_fsc(
    curves: Mapping[str, Mapping], path: str | os.PathLike, voxel_size_A: float | None = None,
    title: str = "FSC against the ground truth",
) -> tuple[Path, Path]:
    """FSC curves of several methods against the truth (paper Fig. 4), or of any pairs named by ``title``.

    ``curves``: name -> an :func:`icetide.metrics.fsc` dict (``frequency`` in cycles/voxel, ``fsc``, and
    optionally ``n_voxels``). Lines at 0.5 and 0.143; a top axis in 1/Angstrom when ``voxel_size_A`` is known.
    CSV columns: ``name, frequency_cycles_per_voxel, fsc, n_voxels``.
    """
    path = Path(path)
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    rows = []
    for name, curve in curves.items():
        freq, values = np.asarray(curve["frequency"]), np.asarray(curve["fsc"])
        counts = curve.get("n_voxels", [""] * len(freq))
        ax.plot(freq, values, label=name, lw=1.6)
        rows += [(name, f"{f:.6g}", f"{c:.6g}", n) for f, c, n in zip(freq, values, counts)]
    for threshold, style in zip(FSC_THRESHOLDS, ("--", ":")):
        ax.axhline(threshold, color="0.4", ls=style, lw=1, label=f"FSC = {threshold:g}")
    ax.set_xlim(0, 0.5)
    ax.set_ylim(min(-0.1, ax.get_ylim()[0]), 1.05)
    ax.set_xlabel("spatial frequency (cycles/voxel)")
    ax.set_ylabel("Fourier shell correlation")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    if voxel_size_A:
        top = ax.secondary_xaxis("top", functions=(lambda f: f / voxel_size_A, lambda k: k * voxel_size_A))
        top.set_xlabel(f"spatial frequency (1/Å, voxel {voxel_size_A:g} Å)")
    ax.set_title(title)
    _save(fig, path)
    return path, _write_csv(path.with_suffix(".csv"), ("name", "frequency_cycles_per_voxel", "fsc", "n_voxels"), rows)


def _central_slices(volume: np.ndarray) -> dict[str, np.ndarray]:
    """The XY, XZ and YZ planes through the centre voxel of a ``(nz, ny, nx)`` volume."""
    nz, ny, nx = volume.shape
    return {"XY": volume[nz // 2], "XZ": volume[:, ny // 2, :], "YZ": volume[:, :, nx // 2]}


def _check_volumes(volumes: Mapping[str, np.ndarray]) -> None:
    if not volumes:
        raise ValueError("no volumes to plot")
    for name, v in volumes.items():
        if np.ndim(v) != 3:
            raise ValueError(f"{name}: expected a 3-D volume, got shape {np.shape(v)}")


def _panel_grid(fig: Figure, n_rows: int, widths: Sequence[float]):
    return fig.subplots(n_rows, len(widths), squeeze=False, gridspec_kw={"width_ratios": widths})


def plot_orthoslices(volumes: Mapping[str, np.ndarray], path: str | os.PathLike) -> tuple[Path, Path]:
    """Central XY, XZ and YZ slices, one row per volume in the given order (truth first; paper Fig. 5).

    Each row shares one grey scale, from the 1st to the 99th percentile of its three slices.
    JSON: slice indices and each row's display range.
    """
    path = Path(path)
    _check_volumes(volumes)
    nz, ny, nx = next(iter(volumes.values())).shape
    widths = (nx, nx, ny)
    panel_h = 2.6 * max(ny, nz) / max(nx, ny)
    fig = _figure(2.8 * sum(widths) / max(widths) + 0.8, panel_h * len(volumes) + 0.6)
    axes = _panel_grid(fig, len(volumes), widths)
    info = {"slice_index_zyx": [nz // 2, ny // 2, nx // 2], "percentiles": _PERCENTILES, "rows": {}}
    for row, (name, volume) in zip(axes, volumes.items()):
        volume = np.asarray(volume, dtype=np.float32)
        slices = _central_slices(volume)
        lo, hi = np.percentile(np.concatenate([s.ravel() for s in slices.values()]), _PERCENTILES)
        info["rows"][name] = {"shape_zyx": list(volume.shape), "display_range": [float(lo), float(hi)]}
        for ax, (plane, image) in zip(row, slices.items()):
            ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
            ax.set_title(f"{name}: {plane}", fontsize="small")
            ax.set_xlabel({"XY": "x", "XZ": "x", "YZ": "y"}[plane] + " (voxels)", fontsize="x-small")
            ax.set_ylabel({"XY": "y", "XZ": "z", "YZ": "z"}[plane] + " (voxels)", fontsize="x-small")
            ax.tick_params(labelsize="x-small")
    fig.suptitle(f"central slices (z={nz // 2}, y={ny // 2}, x={nx // 2})")
    _save(fig, path)
    data_path = path.with_suffix(".json")
    write_json(data_path, info)
    return path, data_path


def _log_spectrum(image: np.ndarray) -> np.ndarray:
    """``log10 |FFT|`` of a 2-D image (mean removed), zero frequency at the centre."""
    spectrum = np.fft.fftshift(np.fft.fft2(image - image.mean()))
    return np.log10(np.abs(spectrum) + 1e-12)


def plot_fourier_slices(volumes: Mapping[str, np.ndarray], path: str | os.PathLike) -> tuple[Path, Path]:
    """Log-magnitude of the 2-D FFT of each volume's central XZ slice (paper Fig. 7: the missing wedge).

    Axes in cycles/voxel (kx, kz), zero at the centre; each panel scaled from its 1st to 99.9th percentile.
    JSON: the slice index and each panel's display range (log10 magnitude).
    """
    path = Path(path)
    _check_volumes(volumes)
    n = len(volumes)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig = _figure(3.2 * cols + 0.6, 3.2 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    info = {"plane": "XZ", "percentiles": [1.0, 99.9], "panels": {}}
    for ax, (name, volume) in zip(axes, volumes.items()):
        volume = np.asarray(volume, dtype=np.float64)
        nz, ny, nx = volume.shape
        image = _log_spectrum(volume[:, ny // 2, :])
        lo, hi = np.percentile(image, info["percentiles"])
        # Pixel edges of the fftshifted frequencies, so that each axis spans its own [-0.5, 0.5) range.
        kx, kz = np.fft.fftshift(np.fft.fftfreq(nx)), np.fft.fftshift(np.fft.fftfreq(nz))
        extent = (kx[0] - 0.5 / nx, kx[-1] + 0.5 / nx, kz[0] - 0.5 / nz, kz[-1] + 0.5 / nz)
        im = ax.imshow(image, cmap="magma", vmin=lo, vmax=hi, origin="lower", extent=extent, aspect="equal")
        ax.set_title(name, fontsize="small")
        ax.set_xlabel("kx (cycles/voxel)", fontsize="x-small")
        ax.set_ylabel("kz (cycles/voxel)", fontsize="x-small")
        ax.tick_params(labelsize="x-small")
        bar = fig.colorbar(im, ax=ax, shrink=0.8)
        bar.set_label("log10 |FFT|", fontsize="x-small")
        bar.ax.tick_params(labelsize="x-small")
        info["panels"][name] = {"slice_index_y": ny // 2, "display_range": [float(lo), float(hi)]}
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle("2-D Fourier transform of the central XZ slice")
    _save(fig, path)
    data_path = path.with_suffix(".json")
    write_json(data_path, info)
    return path, data_path


def plot_local_fields(
    true: Deformations, est: Deformations, tilts: Sequence[int], path: str | os.PathLike, mesh: int = 12
) -> tuple[Path, Path]:
    """True (black) and estimated (red) local fields ``phi_m`` of the chosen tilts on a common mesh (paper Fig. 6).

    ``tilts``: tilt indices. Arrows are magnified by a common factor (noted in the title) so that the
    largest displacement spans about one mesh cell. JSON: the mesh and both fields per tilt, pixels.
    """
    path = Path(path)
    tilts = [int(t) for t in tilts]
    if not tilts or min(tilts) < 0 or max(tilts) >= min(true.n_tilts, est.n_tilts):
        raise ValueError(f"tilt indices must lie in [0, {min(true.n_tilts, est.n_tilts) - 1}], got {tilts}")
    if true.detector_shape != est.detector_shape:
        raise ValueError(f"different detectors: {true.detector_shape} vs {est.detector_shape}")
    ny, nx = true.detector_shape
    u, v = detector_mesh(true.detector_shape, mesh)
    phi_true, phi_est = local_field(true.subset(tilts), u, v), local_field(est.subset(tilts), u, v)
    largest = max(float(np.abs(phi_true).max()), float(np.abs(phi_est).max()), 1e-6)
    cell = max(nx, ny) / (mesh - 1)
    magnify = cell / largest
    fig = _figure(3.6 * len(tilts) + 0.4, 3.6 * ny / nx + 1.2)
    axes = fig.subplots(1, len(tilts), squeeze=False)[0]
    for ax, k, tilt in zip(axes, range(len(tilts)), tilts):
        for phi, color, label in ((phi_true[k], "black", "true"), (phi_est[k], "tab:red", "estimated")):
            ax.quiver(u, v, phi[..., 0], phi[..., 1], color=color, angles="xy", scale_units="xy",
                      scale=1 / magnify, width=0.006, label=label)
        ax.set_aspect("equal")
        ax.set_xlim(-nx / 2 - cell, nx / 2 + cell)
        ax.set_ylim(-ny / 2 - cell, ny / 2 + cell)
        ax.set_title(f"tilt {tilt} ({true.tilt_angles_deg[tilt]:+.1f}°)", fontsize="small")
        ax.set_xlabel("u (pixels)", fontsize="x-small")
        ax.set_ylabel("v (pixels)", fontsize="x-small")
        ax.tick_params(labelsize="x-small")
    axes[0].legend(loc="upper right", fontsize="x-small")
    fig.suptitle(f"local displacement fields, arrows magnified x{magnify:.3g} (largest {largest:.3g} px)")
    _save(fig, path)
    data_path = path.with_suffix(".json")
    write_json(data_path, {
        "tilts": tilts,
        "tilt_angles_deg": true.tilt_angles_deg[tilts],
        "mesh_u_px": u,
        "mesh_v_px": v,
        "arrow_magnification": magnify,
        "true_px": phi_true,
        "estimated_px": phi_est,
    })
    return path, data_path


def plot_deformation_errors(
    errors: Mapping, tilt_angles_deg, path: str | os.PathLike
) -> tuple[Path, Path]:
    """Per-tilt shift error (after the gauge), rotation error and mean local-field error.

    ``errors``: a :func:`icetide.metrics.deformation_errors` dict. CSV columns: ``tilt_angle_deg,
    shift_error_px, rotation_error_deg, local_error_px``.
    """
    path = Path(path)
    angles = np.asarray(tilt_angles_deg, dtype=np.float64)
    shift = np.asarray(errors["shift_error_per_tilt_px"], dtype=np.float64)
    rotation = np.asarray(errors["rotation_error_per_tilt_deg"], dtype=np.float64)
    local = np.asarray(errors["local_error_per_tilt_px"], dtype=np.float64)
    if not len(angles) == len(shift) == len(rotation) == len(local):
        raise ValueError(f"{len(angles)} tilt angles for {len(shift)} per-tilt errors")
    fig = _figure(7, 7)
    axes = fig.subplots(3, 1, sharex=True)
    panels = (
        (shift, "shift error (px)", f"shift error after gauge removal, RMS {errors['shift_rms_px']:.3g} px"),
        (rotation, "rotation error (°)",
         f"in-plane rotation error (est - true), MAE {errors['rotation_mae_deg']:.3g}°"),
        (local, "local error (px)", f"mean local-field error, overall {errors['local_mean_error_px']:.3g} px "
                                     f"(true field mean {errors['local_true_mean_px']:.3g} px)"),
    )
    for ax, (values, ylabel, title) in zip(axes, panels):
        ax.plot(angles, values, "o-", ms=3, lw=1)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize="small")
        ax.grid(alpha=0.3)
    axes[0].set_ylim(bottom=0)
    axes[1].axhline(0, color="0.4", lw=0.8)
    axes[2].set_ylim(bottom=0)
    axes[-1].set_xlabel("tilt angle (°)")
    _save(fig, path)
    rows = [(f"{a:.6g}", f"{s:.6g}", f"{r:.6g}", f"{q:.6g}") for a, s, r, q in zip(angles, shift, rotation, local)]
    header = ("tilt_angle_deg", "shift_error_px", "rotation_error_deg", "local_error_px")
    return path, _write_csv(path.with_suffix(".csv"), header, rows)


def plot_curves(
    curves: Mapping[str, tuple],
    path: str | os.PathLike,
    xlabel: str,
    ylabel: str,
    hlines: Mapping[str, float] | Sequence[float] | None = None,
    logy: bool = False,
    vlines: Mapping[str, float] | None = None,
    markers: bool = False,
    spans: Mapping[str, tuple[float, float]] | None = None,
) -> tuple[Path, Path]:
    """A generic line plot, e.g. training curves: ``curves`` maps a name to ``(x, y)``.

    ``hlines``: reference values drawn as dashed lines (a mapping gives them labels); ``vlines``: labelled
    positions on x drawn as dotted lines; ``spans``: labelled ranges ``(start, stop)`` of x, shaded;
    ``markers``: mark the data points. CSV columns: ``name, x, y``.
    """
    path = Path(path)
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    rows = []
    for name, (x, y) in curves.items():
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if x.shape != y.shape:
            raise ValueError(f"{name}: x and y differ in shape: {x.shape} vs {y.shape}")
        ax.plot(x, y, "o-" if markers else "-", label=name, lw=1.4, ms=3)
        rows += [(name, f"{a:.8g}", f"{b:.8g}") for a, b in zip(x, y)]
    references = hlines.items() if isinstance(hlines, Mapping) else ((None, h) for h in (hlines or ()))
    for label, value in references:
        ax.axhline(value, color="0.4", ls="--", lw=1, label=label)
    for label, value in (vlines or {}).items():
        ax.axvline(value, color="tab:red", ls=":", lw=1.2, label=label)
    for label, (start, stop) in (spans or {}).items():
        ax.axvspan(start, stop, color="0.85", alpha=0.6, lw=0, label=label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if curves or isinstance(hlines, Mapping) or vlines or spans:
        ax.legend(fontsize="small")
    _save(fig, path)
    return path, _write_csv(path.with_suffix(".csv"), ("name", "x", "y"), rows)


def plot_bars(
    groups: Sequence[str], values: Mapping[str, Sequence[float]], path: str | os.PathLike, ylabel: str
) -> tuple[Path, Path]:
    """Grouped bars: one group per entry of ``groups``, one bar per key of ``values`` (each as long as
    ``groups``). CSV columns: ``group, name, value``."""
    path = Path(path)
    names = list(values)
    for name in names:
        if len(values[name]) != len(groups):
            raise ValueError(f"{name}: {len(values[name])} values for {len(groups)} groups")
    fig = _figure(max(6.0, 1.2 * len(groups) + 2), 4.5)
    ax = fig.add_subplot()
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(groups))
    for k, name in enumerate(names):
        ax.bar(x + (k - (len(names) - 1) / 2) * width, values[name], width, label=name)
    ax.set_xticks(x, groups, rotation=20, ha="right", fontsize="small")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncols=min(len(names), 3))
    _save(fig, path)
    rows = [(g, name, f"{values[name][i]:.8g}") for name in names for i, g in enumerate(groups)]
    return path, _write_csv(path.with_suffix(".csv"), ("group", "name", "value"), rows)
