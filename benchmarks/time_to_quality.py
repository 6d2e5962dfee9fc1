"""Time to quality: CC of the fitted volume with the truth along the fit, against the FBP oracle's CC.

Usage: ``python benchmarks/time_to_quality.py [--every 5] [--epochs 250] [--blobs] [--plot PNG] [--device cpu]``
and, at the paper's scale on a GPU, ``python benchmarks/time_to_quality.py --device cuda --phantom
../shared/data/phantoms/polnet_512x512x180_1nm_seed512/tomo_001_den.mrc.gz --tilt-step 2 --volume paper
--score-epochs 5,10,15,25,40,70 --epochs 400 --minutes 1.5`` (as ``benchmarks/gpu_checks.sh`` runs it).

Default problem: the one of ``benchmarks/quality.py`` (128 x 128 x 48 phantom of real protein maps, 41 tilts,
paper profile, 10 dB). ``--phantom`` takes a ground-truth MRC instead (unbinned), ``--tilt-step 2`` gives 61
tilts from -60 to +60 degrees, ``--volume paper`` the paper's encoding and MLP (8 x 4 features, 2**22 rows, base
8, scale 2, MLP 3 x 64); ``--kernel``, ``--precision``, ``--recompute``, ``--max-memory``, ``--validation`` and
``--binned-epochs``, ``--binned-bands`` are the ``fit`` settings ``kernel``, ``precision``, ``recompute_field``,
``max_memory_gb``, ``validation``, ``binned_epochs`` and ``binned_bands``. The fit
uses the default settings without early stopping (``patience`` beyond ``--epochs``; ``--minutes`` caps it) so
the whole curve is seen; the volume is scored every ``--every`` epochs, or at the epochs of ``--score-epochs``,
by :func:`icetide.experiments.epochs.cc_along_fit` (the ``icetide experiment epochs`` machinery; scoring time
excluded). Prints one JSON object: ``oracle_cc`` (FBP of the undeformed noisy series), ``curve`` (epoch, fit
seconds, CC), ``time_to_oracle_s`` / ``epoch_to_oracle`` (first scored epoch whose CC reaches the oracle's; null
if none), ``early_stopping_epoch`` (the best validation epoch of the held-out pixels, which the default run would
return) and the CC there, ``simulation_s``, ``fit`` (epochs, steps, lattice rows, kernel, precision) and
``peak_memory`` (CPU RSS; on CUDA the allocator's peak). ``--plot`` draws the paper's Fig. 9. Each scored
point is also printed to stderr as it comes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from icetide.config import VolumeSettings
from icetide.experiments import machine_info
from icetide.experiments.case import Acquisition, load_phantom, reconstruction_config
from icetide.experiments.epochs import cc_along_fit, plot_cc_along_fit
from icetide.runtime import resolve_device
from icetide.memory import PeakMemory
from icetide.simulate import crowded_phantom, simulate_tilt_series

PROTEINS = Path(__file__).resolve().parents[2] / "shared" / "data" / "proteins" / "maps_10A"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--score-epochs", default=None, help="score at these epochs (e.g. 5,10,20) instead of --every")
    parser.add_argument("--epochs", type=int, default=250)
    parser.add_argument("--minutes", type=float, default=None, help="cap on the fit's wall time")
    parser.add_argument("--blobs", action="store_true", help="Gaussian-blob proteins (no shared data needed)")
    parser.add_argument("--phantom", type=Path, default=None, help="ground-truth MRC volume (unbinned)")
    parser.add_argument("--tilt-step", type=float, default=3.0, help="degrees between tilts, -60..+60")
    parser.add_argument("--volume", choices=["default", "paper"], default="default")
    parser.add_argument("--kernel", choices=["auto", "triton", "numba", "torch"], default="auto")
    parser.add_argument("--precision", choices=["fp32", "mixed"], default="fp32")
    parser.add_argument("--recompute", action="store_true", help="fit.recompute_field")
    parser.add_argument("--max-memory", type=float, default=None, help="fit.max_memory_gb")
    parser.add_argument("--validation", choices=["steps", "pass"], default="steps", help="fit.validation")
    parser.add_argument("--binned-epochs", type=int, default=None, help="fit.binned_epochs (default: auto)")
    parser.add_argument("--binned-bands", type=int, default=None, help="fit.binned_bands (default: the fit's)")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if args.phantom is None and not args.blobs and not PROTEINS.is_dir():
        print(f"skipped: {PROTEINS} is absent (use --blobs)", file=sys.stderr)
        sys.exit(3)
    if args.phantom is not None and not args.phantom.is_file():
        print(f"skipped: {args.phantom} is absent", file=sys.stderr)
        sys.exit(3)
    device = resolve_device(args.device)

    acquisition = Acquisition(tilt_step_deg=args.tilt_step, seed=args.seed)
    if args.phantom is not None:
        truth, voxel_A, _ = load_phantom(args.phantom)
        source = str(args.phantom)
    else:
        truth = crowded_phantom((48, 128, 128), seed=args.seed, proteins_dir=None if args.blobs else PROTEINS)
        voxel_A, source = 10.0, "blobs" if args.blobs else "protein maps"
    t0 = time.perf_counter()
    # The simulation runs on the fit's device (the projections of a 512-voxel volume take minutes on a CPU).
    sim = simulate_tilt_series(torch.from_numpy(truth).to(device), acquisition.tilt_angles_deg(),
                               snr_db=acquisition.snr_db, seed=args.seed)
    simulation_s = time.perf_counter() - t0
    config = reconstruction_config(truth.shape[0], voxel_A, epochs=args.epochs, seed=args.seed, device=args.device,
                                   patience=args.epochs + 1, max_minutes=args.minutes, kernel=args.kernel,
                                   precision=args.precision, recompute_field=args.recompute,
                                   max_memory_gb=args.max_memory, validation=args.validation,
                                   binned_epochs=args.binned_epochs,
                                   **({} if args.binned_bands is None else {"binned_bands": args.binned_bands}))
    if args.volume == "paper":
        paper = VolumeSettings.paper()
        config.volume = VolumeSettings(**{k: getattr(paper, k) for k in VolumeSettings.model_fields})
    with PeakMemory(device) as used:
        every = {int(e) for e in args.score_epochs.split(",")} if args.score_epochs else args.every
        result = cc_along_fit(truth, sim, voxel_A, config, every,
                              on_score=lambda point: print(json.dumps(point), file=sys.stderr, flush=True))
    print(json.dumps({
        "benchmark": "time_to_quality", "phantom": source, "volume_shape_zyx": list(truth.shape),
        "n_tilts": len(sim.tilt_angles_deg), "snr_db": acquisition.snr_db, "volume": args.volume,
        "kernel": args.kernel, "precision": args.precision, "recompute_field": args.recompute,
        "max_memory_gb": args.max_memory, "validation": args.validation, "binned_epochs": args.binned_epochs,
        "binned_bands": config.fit.binned_bands,
        "simulation_s": simulation_s, **result,
        "peak_memory": used.as_dict(), "machine": machine_info(args.device),
    }, indent=1))
    if args.plot is not None:
        plot_cc_along_fit(result, args.plot, len(sim.tilt_angles_deg))


if __name__ == "__main__":
    main()
