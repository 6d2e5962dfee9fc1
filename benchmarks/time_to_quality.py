"""Time to quality: CC of the fitted volume with the truth along the fit, against the FBP oracle's CC.

Usage: ``python benchmarks/time_to_quality.py [--every 5] [--epochs 250] [--blobs] [--plot PNG] [--device cpu]``

The problem of ``benchmarks/quality.py`` (128 x 128 x 48 phantom of real protein maps, 41 tilts, paper profile,
10 dB) fitted with the default settings, but without early stopping (``patience`` beyond ``--epochs``) so the
whole curve is seen; scored by :func:`icetide.experiments.epochs.cc_along_fit` (the ``icetide experiment
epochs`` machinery). Prints one JSON object: ``oracle_cc`` (FBP of the undeformed noisy series), ``curve``
(epoch, fit seconds, CC), ``time_to_oracle_s`` / ``epoch_to_oracle`` (first scored epoch whose CC reaches the
oracle's; null if none), ``early_stopping_epoch`` (the best validation epoch of the held-out pixels, which the
default run would return) and the CC there. ``--plot`` draws the paper's Fig. 9.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from icetide.experiments import machine_info
from icetide.experiments.case import Acquisition, reconstruction_config
from icetide.experiments.epochs import cc_along_fit, plot_cc_along_fit
from icetide.memory import PeakMemory
from icetide.fit import resolve_device
from icetide.simulate import crowded_phantom, simulate_tilt_series

PROTEINS = Path(__file__).resolve().parents[2] / "shared" / "data" / "proteins" / "maps_10A"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=250)
    parser.add_argument("--blobs", action="store_true", help="Gaussian-blob proteins (no shared data needed)")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if not args.blobs and not PROTEINS.is_dir():
        print(f"skipped: {PROTEINS} is absent (use --blobs)", file=sys.stderr)
        sys.exit(3)

    shape = (48, 128, 128)
    acquisition = Acquisition(seed=args.seed)
    truth = crowded_phantom(shape, seed=args.seed, proteins_dir=None if args.blobs else PROTEINS)
    sim = simulate_tilt_series(truth, acquisition.tilt_angles_deg(), snr_db=acquisition.snr_db, seed=args.seed)
    config = reconstruction_config(shape[0], 10.0, epochs=args.epochs, seed=args.seed, device=args.device,
                                   patience=args.epochs + 1)
    with PeakMemory(resolve_device(args.device)) as used:
        result = cc_along_fit(truth, sim, 10.0, config, args.every)
    print(json.dumps({"benchmark": "time_to_quality", "phantom": "blobs" if args.blobs else "protein maps",
                      **result, "peak_memory": used.as_dict(), "machine": machine_info(args.device)}, indent=1))
    if args.plot is not None:
        plot_cc_along_fit(result, args.plot, len(sim.tilt_angles_deg))


if __name__ == "__main__":
    main()
