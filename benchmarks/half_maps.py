"""Half-set resolution (``fit.half_maps``) against the resolution measured with the truth, on a simulation.

Usage: ``python benchmarks/half_maps.py [--splits none,tilts,pixels,series] [--blobs] [--plot PNG] [--seed 0]``

The problem of ``benchmarks/quality.py`` (128 x 128 x 48 phantom of real protein maps, 41 tilts, paper profile,
10 dB; simulated as two frame halves, each with sqrt(2) times the noise, whose mean is the data) is
reconstructed by :func:`icetide.reconstruct.reconstruct` with default settings and each half-map split (``series``:
the two frame halves as the two half series).
For a split, the FSC between the half tomograms (``half_fsc``, what a user without ground truth gets) is turned
into the FSC that the full tomogram should have against a perfect reference, ``sqrt(2 FSC / (1 + FSC))``
(Rosenthal & Henderson 2003; its 0.5 crossing is the half-map FSC's 0.143 crossing), and compared with the FSC
of the full tomogram (the halves' mean) against the truth after registration (``truth_fsc``). Prints one JSON
object per split: CC with the truth, resolution (voxels) at half-map FSC 0.143 and at truth FSC 0.5, the mean
absolute difference between predicted and measured curves below Nyquist, fit time and epochs. ``--plot`` draws
both curves of every split.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from icetide.data import TiltSeries
from icetide.experiments import machine_info
from icetide.experiments.case import Acquisition, reconstruction_config
from icetide.io import read_mrc
from icetide.metrics import FSC_TAPER_VOX, evaluate_reconstruction
from icetide.plots import plot_fsc
from icetide.reconstruct import reconstruct
from icetide.simulate import crowded_phantom, simulate_tilt_series

PROTEINS = Path(__file__).resolve().parents[2] / "shared" / "data" / "proteins" / "maps_10A"


def predicted_reference_fsc(half_fsc: np.ndarray) -> np.ndarray:
    """FSC of the full map against a perfect reference implied by the half-map FSC."""
    clipped = np.clip(half_fsc, 0.0, 1.0)
    return np.sqrt(2 * clipped / (1 + clipped))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", default="none,tilts,pixels,series")
    parser.add_argument("--blobs", action="store_true", help="Gaussian-blob proteins (no shared data needed)")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.blobs and not PROTEINS.is_dir():
        print(f"skipped: {PROTEINS} is absent (use --blobs)", file=sys.stderr)
        sys.exit(3)
    shape = (48, 128, 128)
    acquisition = Acquisition(seed=args.seed)
    truth = crowded_phantom(shape, seed=args.seed, proteins_dir=None if args.blobs else PROTEINS)
    sim = simulate_tilt_series(truth, acquisition.tilt_angles_deg(), snr_db=acquisition.snr_db, seed=args.seed,
                               frame_halves=True)
    series = TiltSeries(sim.noisy, sim.tilt_angles_deg, 10.0)
    results, curves = {}, {}
    for split in args.splits.split(","):
        if split == "series":  # the two frame halves, whose mean is the data of the other splits
            series = TiltSeries(sim.noisy_halves[0], sim.tilt_angles_deg, 10.0, half_images=sim.noisy_halves[1])
        with tempfile.TemporaryDirectory() as folder:
            report = reconstruct(series, reconstruction_config(shape[0], 10.0, seed=args.seed, half_maps=split),
                                 Path(folder))
            tomogram = read_mrc(Path(folder) / report["outputs"]["tomogram"])[0]
        scored = evaluate_reconstruction(tomogram, truth, 10.0, taper_vox=FSC_TAPER_VOX)
        truth_fsc = np.asarray(scored["fsc"]["fsc"])
        entry = {"cc": scored["cc"], "truth_fsc_0.5_voxels": scored["fsc"]["resolution"]["0.5"]["voxels"],
                 "fit_seconds": report["fit_seconds"], "epochs": report["epochs"], "best_epoch": report["best_epoch"]}
        curves[f"{split}: full vs truth"] = scored["fsc"]
        if "half_maps" in report:
            half = report["half_maps"]
            predicted = predicted_reference_fsc(np.asarray(half["fsc"]))
            entry["half_fsc_0.143_voxels"] = half["resolution"]["0.143"]["voxels"]
            entry["curve_mean_abs_difference"] = float(np.mean(np.abs(predicted - truth_fsc)))
            curves[f"{split}: predicted from the halves"] = {"frequency": half["frequency_cycles_per_voxel"],
                                                            "fsc": predicted}
        results[split] = entry
        print(json.dumps({split: entry}), file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "half_maps", "phantom": "blobs" if args.blobs else "protein maps",
                      "results": results, "machine": machine_info("cpu")}, indent=1))
    if args.plot is not None:
        plot_fsc(curves, args.plot, 10.0, title="Full tomogram vs truth, and as predicted from the half maps")


if __name__ == "__main__":
    main()
