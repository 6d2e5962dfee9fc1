"""The real-data example: etspy's HAADF needle tilt series against its published alignment (docs/REAL_DATA.md).

Usage::

    python benchmarks/needle.py prepare DIR        # DIR/ts.mrc (vacuum level removed), DIR/ts.tlt
    icetide reconstruct DIR/ts.mrc --angles DIR/ts.tlt --tilt-axis-angle 90 --tilt-axis-search 6 \
        --thickness 96 -o DIR/rec --max-minutes 6 --config DIR/fit.yaml
    python benchmarks/needle.py compare DIR        # prints JSON, writes DIR/needle_slices.png

``prepare`` subtracts each image's vacuum level (its 20th percentile: vacuum fills most of the field) because
icetide's forward model has zero density outside the specimen, and writes a config with one Adam step over
all 77 tilts and the tilt-axis refinement (``deform.axis_offset``) switched on. ``compare`` reads etspy's
alignment from ``HAADF_Aligned.hspy`` (needs h5py): per-tilt shifts
``s`` (row, column order) with ``aligned = rotate(shift(raw, s), tiltaxis)`` (etspy's ``trans_stack``), so the
raw axis is at ``psi = 90 - tiltaxis`` degrees from the image y axis in icetide's convention, the raw-frame shift
of icetide's model is ``t = -(s_x, s_y)`` and ``tau = R(alpha) t`` with ``alpha = -psi``. It reports the RMS of icetide's shifts minus
the reference after removing the best-fitting 3-D translation (the gauge), the estimated tilt-axis direction,
and writes central slices of icetide's tomogram, FBP of the raw series and FBP of the series aligned with the
reference shifts and axis. Exits 3 when the data are absent.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "etspy_needle_haadf"
PIXEL_SIZE_A = 33.6


def _raw() -> tuple[np.ndarray, np.ndarray]:
    import mrcfile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # old FEI header: mrcfile warns, permissive mode reads it
        with mrcfile.open(DATA / "HAADF.mrc", permissive=True) as m:
            images = m.data.astype(np.float32)
    return images, np.loadtxt(DATA / "HAADF.rawtlt")


def prepare(folder: Path) -> None:
    from icetide.io import write_mrc, write_tlt

    images, angles = _raw()
    vacuum = np.percentile(images.reshape(len(images), -1), 20, axis=1)
    folder.mkdir(parents=True, exist_ok=True)
    write_mrc(folder / "ts.mrc", images - vacuum[:, None, None], PIXEL_SIZE_A, stack=True)
    write_tlt(folder / "ts.tlt", angles)
    (folder / "fit.yaml").write_text("deform: {axis_offset: true, axis_search: profiles}\nfit: {tilts_per_step: 80}\n")
    print(json.dumps({"prepared": str(folder), "n_tilts": len(angles), "vacuum_level": float(vacuum.mean())}))


def _rotation(alpha_rad: np.ndarray) -> np.ndarray:
    c, s = np.cos(alpha_rad), np.sin(alpha_rad)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def compare(folder: Path) -> None:
    import h5py
    import torch

    from icetide.deform import Deformations, remove_gauge
    from icetide.io import read_deformations, read_mrc
    from icetide.plots import plot_orthoslices
    from icetide.classical import align_series, fbp

    rec = folder / "rec"
    est = read_deformations(rec / "deformations.json")
    report = json.loads((rec / "report.json").read_text())
    with h5py.File(DATA / "HAADF_Aligned.hspy", "r") as f:
        meta = f["Experiments/__unnamed__/metadata/Tomography"]
        ref_shifts_yx = meta["_sig_shifts/data"][:]
        ref_axis_deg = float(meta.attrs["tiltaxis"])
    # etspy's tiltaxis is the rotation its trans_stack (skimage, [[cos, -sin], [sin, cos]] on (column, row))
    # applies to make the axis horizontal: the raw axis lies at -tiltaxis from the image x axis, counter-clockwise
    # in icetide's frame, i.e. psi = 90 - tiltaxis from the image y axis (checked on a drawn line).
    ref_psi_deg = 90.0 - ref_axis_deg
    alpha_ref = np.full(len(est.angles_deg), -np.deg2rad(ref_psi_deg))
    t_ref = -ref_shifts_yx[:, ::-1]
    tau_ref = np.einsum("mij,mj->mi", _rotation(alpha_ref), t_ref)
    residual, translation = remove_gauge(est.shifts_px - tau_ref, est.tilt_angles_deg)
    error = np.linalg.norm(residual, axis=1)
    ref_spread, _ = remove_gauge(tau_ref, est.tilt_angles_deg)

    images, angles = read_mrc(folder / "ts.mrc")[0], est.tilt_angles_deg
    thickness = read_mrc(rec / report["outputs"]["tomogram"])[0].shape[0]
    reference = Deformations(angles, tau_ref, np.rad2deg(alpha_ref), np.zeros((len(angles), 2, 2, 2)),
                             est.detector_shape)
    turn_only = Deformations(angles, np.zeros((len(angles), 2)), np.full(len(angles), -90.0),
                             np.zeros((len(angles), 2, 2, 2)), est.detector_shape)
    series = torch.tensor(images)
    volumes = {
        "icetide": read_mrc(rec / report["outputs"]["tomogram"])[0],
        "fbp_icetide_aligned": read_mrc(rec / report["outputs"]["fbp"])[0],
        "fbp_reference_aligned": fbp(align_series(series, reference), angles, thickness).numpy(),
        "fbp_raw (axis turned only)": fbp(align_series(series, turn_only), angles, thickness).numpy(),
    }
    plot_orthoslices(volumes, folder / "needle_slices.png")
    mean_alpha = float(est.angles_deg.mean())
    print(json.dumps({
        "shift_rms_vs_reference_px": float(np.sqrt(np.mean(error**2))),
        "shift_max_vs_reference_px": float(error.max()),
        "reference_shift_rms_px_after_gauge": float(np.sqrt(np.mean(np.sum(ref_spread**2, 1)))),
        "gauge_translation_xyz_vox": translation.tolist(),
        "icetide_mean_alpha_deg": mean_alpha,
        "icetide_tilt_axis_from_x_deg": -mean_alpha - 90.0,
        "reference_tiltaxis_deg": ref_axis_deg,
        "reference_tilt_axis_from_x_deg": ref_psi_deg - 90.0,
        "tilt_axis_difference_deg": (-mean_alpha - 90.0) - (ref_psi_deg - 90.0),
        "tilt_axis_search": {k: report["tilt_axis_search"][k] for k in ("start_deg", "estimate_deg", "used")}
        if "tilt_axis_search" in report else None,
        "fit": {k: report[k] for k in ("epochs", "best_epoch", "stop_reason", "fit_seconds")},
        "tilt_axis_offset_deg": report.get("tilt_axis_offset_deg"),
    }, indent=1))


def main() -> None:
    if not DATA.is_dir():
        print(f"skipped: {DATA} is absent", file=sys.stderr)
        sys.exit(3)
    if len(sys.argv) != 3 or sys.argv[1] not in ("prepare", "compare"):
        print(__doc__.split("Usage::")[1].split('"""')[0], file=sys.stderr)
        sys.exit(2)
    (prepare if sys.argv[1] == "prepare" else compare)(Path(sys.argv[2]))


if __name__ == "__main__":
    main()
