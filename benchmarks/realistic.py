"""Realistic cryo-ET acquisitions with known truth: icetide run as a cryo-ET user would, against the oracle.

Usage: ``python benchmarks/realistic.py --out DIR [--snr-db 0 -10] [--seeds 0 1] [--field-of-view 160 | NY NX]
[--tilt-axis-deg 3] [--max-minutes 10] [--reconstruct-args "..."]``; a case whose
``DIR/<case>/icetide/report.json`` exists is scored again without a new fit.

Each case is :func:`icetide.simulate.cryo.simulate_cryo` of a generated crowded specimen (protein maps from
``../shared/data/proteins/maps_10A`` when present, Gaussian blobs otherwise) with the default acquisition
(10 A pixels, 41 tilts dose-symmetric, 3 e/A^2 each, defocus 4 +- 0.3 um with a 0.05-um estimation error, drift
up to 18 px, tilt axis 3 deg with the .mdoc 1 deg off, six gold beads, the specimen 960 A thick and 200 A above
the tilt axis, Poisson counts), the counts level set by ``--snr-db`` (the specimen's contrast SNR). Then:

- ``icetide``: ``icetide reconstruct tilt_series.mrc --mdoc tilt_series.mrc.mdoc --invert --defocus
  tilt_series.defocus --exposure-weighting --thickness NZ`` (the README's command: phase flipping, the default
  CTF correction);
  ``fbp_aligned``: its ``tilt_series_fbp.mrc``;
- ``fbp_oracle``: FBP of the same acquisition without deformations (its own noise draw), made relative contrast
  with the true levels, phase-flipped with the true defocus and exposure-weighted, over the true specimen box;
- ``fbp_anchor``: the classical anchor: cumulative cross-correlation of neighbouring views (tiltxcorr-like,
  :func:`icetide.prealign.coarse_alignment` about the .mdoc's axis), the same corrections with the estimated
  defocus, FBP centred on the specimen's height as icetide centres its own.

Scores against the specimen without beads (a ball 3 voxels larger than each bead left out), after
registration: CC, FSC 0.5 and 0.143 (Angstrom), and the per-view shift error after the 3-D gauge
(:func:`icetide.metrics.deformation_errors`). Prints one JSON object with every case and the ratios the
realistic-acquisition issue asks for (``icetide_cc / fbp_oracle_cc`` >= 1.3, ``fbp_aligned_cc / fbp_oracle_cc``
>= 0.95, icetide's shift error <= 0.5 px).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from icetide.config import ReconstructConfig
from icetide.data import TiltSeries
from icetide.evaluation import evaluate_volumes
from icetide.geometry import frame_quarter_turns
from icetide.io import read_deformations, read_mrc, write_json, write_mrc
from icetide.metrics import FSC_TAPER_VOX, deformation_errors
from icetide.prealign import coarse_alignment
from icetide.classical import align_series, fbp
from icetide.correction import correct_optics
from icetide.start import specimen_centre_z
from icetide.simulate.cryo import CryoAcquisition, cryo_specimen, simulate_cryo, write_cryo

PROTEINS = Path(__file__).resolve().parents[2] / "shared" / "data" / "proteins" / "maps_10A"
METHODS = ("icetide", "fbp_aligned", "fbp_anchor", "fbp_oracle")


def simulate(case: Path, snr_db: float, seed: int, field_of_view: tuple[int, int], tilt_axis_deg: float) -> dict:
    """Simulate one case into ``case`` (skipped when ``simulation.json`` is there); returns its truth.
    ``field_of_view``: ``(ny, nx)`` px."""
    if (case / "simulation.json").is_file():
        return json.loads((case / "simulation.json").read_text())
    case.mkdir(parents=True, exist_ok=True)
    settings = CryoAcquisition(field_of_view=field_of_view, snr_db=snr_db, tilt_axis_deg=tilt_axis_deg)
    proteins = PROTEINS if PROTEINS.is_dir() else None
    t0 = time.monotonic()
    sim = simulate_cryo(cryo_specimen(settings, seed, proteins), settings, seed)
    truth = write_cryo(case, sim)
    info = {"snr_db": snr_db, "seed": seed, "proteins": str(proteins) if proteins else "blobs",
            "specimen_nz": int(sim.truth.shape[0]), "simulate_seconds": time.monotonic() - t0, "truth": truth}
    write_json(case / "simulation.json", info)
    return json.loads((case / "simulation.json").read_text())


def run_icetide(case: Path, nz: int, max_minutes: float, extra: list[str]) -> float | None:
    """The README's cryo-ET command into ``case/icetide``; returns its wall time (None when already done)."""
    out = case / "icetide"
    if (out / "report.json").is_file():
        return None
    command = [sys.executable, "-m", "icetide", "reconstruct", str(case / "tilt_series.mrc"),
               "--mdoc", str(case / "tilt_series.mrc.mdoc"), "--invert", "--defocus", str(case / "tilt_series.defocus"),
               "--exposure-weighting", "--thickness", str(nz),
               "--max-minutes", str(max_minutes), "-o", str(out), "--force", *extra]
    t0 = time.monotonic()
    subprocess.run(command, check=True, stdout=sys.stderr)
    return time.monotonic() - t0


def _corrected(images: np.ndarray, angles, px: float, axis: float, defocus, pre_exposure) -> torch.Tensor:
    """Relative contrast images phase-flipped and exposure-weighted as icetide's outputs are."""
    config = ReconstructConfig(thickness=8, pixel_size_A=px, ctf={"correction": "phaseflip", "exposure_weighting": True})
    series = TiltSeries(images.astype(np.float32), angles, px, axis, defocus_A=np.asarray(defocus),
                        pre_exposure_e_per_A2=np.asarray(pre_exposure))
    return torch.from_numpy(correct_optics(series, config, for_fit=False)[0].images)


def oracle(case: Path, info: dict, angles: np.ndarray, px: float, nz: int) -> np.ndarray:
    """FBP of the undeformed acquisition with the true levels, defocus and specimen height."""
    t = info["truth"]
    counts, _ = read_mrc(case / "truth" / "counts_undeformed.mrc")
    contrast = 1 - counts / np.asarray(t["levels_counts"])[:, None, None]
    images = _corrected(contrast, angles, px, 0.0, t["defocus_A"], t["pre_exposure_e_per_A2"])
    off = int(round(t["specimen_centre_z_vox"]))
    volume = fbp(images, angles, nz + 2 * abs(off)).numpy()
    start = off + abs(off)
    return volume[start : start + nz]


def anchor(case: Path, info: dict, angles: np.ndarray, px: float, nz: int) -> tuple[np.ndarray, object]:
    """The classical anchor's tomogram (centred on the specimen) and its deformations (on the detector)."""
    t = info["truth"]
    counts, _ = read_mrc(case / "tilt_series.mrc")
    contrast = 1 - counts / counts.mean(axis=(1, 2), keepdims=True)
    axis = float(t["mdoc_tilt_axis_deg"])
    defocus = np.asarray(t["defocus_file_A"])
    # In the frame icetide reconstructs in: Y along the tilt axis.
    turns = frame_quarter_turns(axis)
    contrast, axis = np.rot90(contrast, turns, axes=(1, 2)), axis - 90 * turns
    images = _corrected(contrast, angles, px, axis, defocus, t["pre_exposure_e_per_A2"])
    d = coarse_alignment(images, angles, axis)
    series = TiltSeries(images.numpy(), angles, px, axis)
    centre = specimen_centre_z(series, d, nz)
    aligned = align_series(images, d)
    depth = 2 * nz
    volume = fbp(aligned, angles, depth).numpy()
    start = int(round(centre + (depth - 1) / 2 - (nz - 1) / 2))
    start = min(max(start, 0), depth - nz)
    return volume[start : start + nz], d.quarter_turned(-turns)


def bead_free_mask(info: dict, shape: tuple[int, int, int]) -> np.ndarray:
    """True away from the beads (each ball grown by 3 voxels), in the truth volume's voxels."""
    t = info["truth"]
    nz, ny, nx = shape
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    x, y = i - (nx - 1) / 2, j - (ny - 1) / 2
    z = k - (nz - 1) / 2 + t["specimen_centre_z_vox"]
    mask = np.ones(shape, dtype=bool)
    for bx, by, bz in t["bead_centres_xyz_vox"]:
        mask &= (x - bx) ** 2 + (y - by) ** 2 + (z - bz) ** 2 > (t["bead_radius_vox"] + 3) ** 2
    return mask


def score(case: Path, info: dict, max_minutes: float, extra: list[str]) -> dict:
    truth, px = read_mrc(case / "truth" / "volume.mrc")
    nz = truth.shape[0]
    angles = np.asarray(json.loads((case / "truth" / "deformations.json").read_text())["tilt_angles_deg"])
    wall = run_icetide(case, nz, max_minutes, extra)
    report = json.loads((case / "icetide" / "report.json").read_text())
    volumes = {
        "icetide": read_mrc(case / "icetide" / report["outputs"]["tomogram"])[0],
        "fbp_aligned": read_mrc(case / "icetide" / report["outputs"]["fbp"])[0],
        "fbp_oracle": oracle(case, info, angles, px, nz),
    }
    volumes["fbp_anchor"], anchor_d = anchor(case, info, angles, px, nz)
    for name in ("fbp_oracle", "fbp_anchor"):
        write_mrc(case / f"{name}.mrc", volumes[name], px)
    true_d = read_deformations(case / "truth" / "deformations.json")
    estimated = read_deformations(case / "icetide" / "deformations.json")
    (case / "eval").mkdir(exist_ok=True)
    scores = evaluate_volumes(volumes, truth, case / "eval", px, mask=bead_free_mask(info, truth.shape),
                              taper_vox=FSC_TAPER_VOX, deformations=(true_d, estimated))
    anchor_errors = deformation_errors(true_d, anchor_d)
    rec = scores["reconstructions"]
    out = {
        name: {"cc": rec[name]["cc"],
               "fsc_0.5_A": rec[name]["fsc"]["resolution"]["0.5"]["angstrom"],
               "fsc_0.143_A": rec[name]["fsc"]["resolution"]["0.143"]["angstrom"]}
        for name in METHODS
    }
    out["icetide"]["shift_rms_px"] = scores["deformations"]["shift_rms_px"]
    out["icetide"]["rotation_mae_deg"] = scores["deformations"]["rotation_mae_deg"]
    out["fbp_anchor"]["shift_rms_px"] = anchor_errors["shift_rms_px"]
    oracle_cc = out["fbp_oracle"]["cc"]
    return {
        "snr_db": info["snr_db"], "seed": info["seed"], "snr_db_measured": info["truth"]["snr_db_measured"],
        "level_0_counts": info["truth"]["level_0_counts"],
        "scores": out,
        "ratios": {"icetide_cc_over_oracle": out["icetide"]["cc"] / oracle_cc,
                   "fbp_aligned_cc_over_oracle": out["fbp_aligned"]["cc"] / oracle_cc},
        "tilt_axis": {"true_deg": info["truth"]["tilt_axis_deg"], "mdoc_deg": info["truth"]["mdoc_tilt_axis_deg"],
                      "search": report.get("tilt_axis_search"), "refinement": report.get("tilt_axis_refinement")},
        "start_check": report.get("start_check"),
        "beads": {"refinement": report.get("bead_refinement"), "residual": report.get("bead_residual")},
        # found: the height icetide found, in its own frame; outputs_centre: where its outputs' centre lies in the
        # truth's frame (the z translation between its deformations and the true ones), the true height if centred
        "specimen_centre_z_vox": {"true": info["truth"]["specimen_centre_z_vox"],
                                  "found": report.get("specimen_centre_z_vox"),
                                  "outputs_centre": float(scores["deformations"]["gauge_translation_xyz_vox"][2])},
        "fit": {k: report.get(k) for k in ("epochs", "stop_reason", "best_epoch", "fit_seconds")},
        "icetide_wall_seconds": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="cases are simulated and reconstructed here (kept)")
    parser.add_argument("--snr-db", type=float, nargs="+", default=[0.0, -10.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--field-of-view", type=int, nargs="+", default=[160],
                        help="the detector in px: one size (square) or ny nx")
    parser.add_argument("--tilt-axis-deg", type=float, default=3.0,
                        help="the true tilt axis, counter-clockwise from the image Y axis (the .mdoc says 1 deg more)")
    parser.add_argument("--max-minutes", type=float, default=10.0, help="icetide's fitting budget per case")
    parser.add_argument("--reconstruct-args", default="", help="extra arguments for icetide reconstruct")
    args = parser.parse_args()
    extra = shlex.split(args.reconstruct_args)
    if len(args.field_of_view) not in (1, 2):
        parser.error("--field-of-view takes one size or two (ny nx)")
    field = (args.field_of_view[0], args.field_of_view[-1])
    cases = []
    for snr_db in args.snr_db:
        for seed in args.seeds:
            case = args.out / f"snr{snr_db:g}_seed{seed}"
            info = simulate(case, snr_db, seed, field, args.tilt_axis_deg)
            cases.append(score(case, info, args.max_minutes, extra))
            print(json.dumps(cases[-1]), file=sys.stderr)
    print(json.dumps({
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__},
        "field_of_view": list(field), "tilt_axis_deg": args.tilt_axis_deg, "reconstruct_args": args.reconstruct_args,
        "cases": cases,
    }, indent=1))


if __name__ == "__main__":
    main()
