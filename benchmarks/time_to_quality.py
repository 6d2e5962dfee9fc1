"""Time to quality: CC of the fitted volume with the truth along the fit, against the FBP oracle's CC.

Usage: ``python benchmarks/time_to_quality.py [--every 5] [--epochs 250] [--blobs] [--plot PNG]``

The problem of ``benchmarks/quality.py`` (128 x 128 x 48 phantom of real protein maps, 41 tilts, paper profile,
10 dB) fitted with the default settings, but without early stopping (``patience`` beyond ``--epochs``) so the
whole curve is seen. Every ``--every`` epochs the current volume is sampled and scored like the final one
(registration to the truth, Pearson CC); the scoring time is excluded from the fit time. Prints one JSON
object: ``oracle_cc`` (FBP of the undeformed noisy series), ``curve`` (epoch, fit seconds, CC),
``time_to_oracle_s`` / ``epoch_to_oracle`` (first scored epoch whose CC reaches the oracle's; null if none),
``early_stopping_epoch`` (the best validation epoch of the held-out pixels, which the default run would
return) and the CC there. ``--plot`` draws CC against epochs with the oracle line and the early-stopping
epoch (the paper's Fig. 9).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from icetide import TiltSeries
from icetide.config import ReconstructConfig
from icetide.fit import Fitter
from icetide.metrics import evaluate_reconstruction
from icetide.recon import fbp
from icetide.reconstruct import coarse_start, sample_tomogram
from icetide.simulate import crowded_phantom, simulate_tilt_series

PROTEINS = Path(__file__).resolve().parents[2] / "shared" / "data" / "proteins" / "maps_10A"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=250)
    parser.add_argument("--blobs", action="store_true", help="Gaussian-blob proteins (no shared data needed)")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.blobs and not PROTEINS.is_dir():
        print(f"skipped: {PROTEINS} is absent (use --blobs)", file=sys.stderr)
        sys.exit(3)

    shape = (48, 128, 128)
    angles = np.linspace(-60, 60, 41)
    truth = crowded_phantom(shape, seed=args.seed, proteins_dir=None if args.blobs else PROTEINS)
    sim = simulate_tilt_series(truth, angles, profile="paper", snr_db=10.0, seed=args.seed)
    oracle_cc = evaluate_reconstruction(fbp(torch.from_numpy(sim.noisy_undeformed), angles, shape[0]).numpy(),
                                        truth)["cc"]
    series = TiltSeries(sim.noisy, angles, 10.0)
    config = ReconstructConfig.model_validate(
        {"thickness": shape[0], "fit": {"epochs": args.epochs, "patience": args.epochs + 1, "seed": args.seed}}
    )
    fitter = Fitter(series, config, coarse_start(series, config))
    curve: list[tuple[int, float, float]] = []
    scoring_s = [0.0]

    def on_epoch(info: dict) -> None:
        if info["epoch"] % args.every:
            return
        t0 = time.monotonic()
        tomogram = sample_tomogram(fitter.volume, np.zeros(3), fitter.density_scale)
        score = evaluate_reconstruction(tomogram, truth)["cc"]
        curve.append((info["epoch"], info["elapsed_s"] - scoring_s[0], score))
        scoring_s[0] += time.monotonic() - t0

    fitter.run(on_epoch=on_epoch)
    best_epoch = int(fitter.curves["epoch"][int(np.nanargmin(fitter.curves["val_loss"]))])
    reached = next((c for c in curve if c[2] >= oracle_cc), None)
    nearest = min(curve, key=lambda c: abs(c[0] - best_epoch))
    result = {
        "benchmark": "time_to_quality",
        "phantom": "blobs" if args.blobs else "protein maps",
        "oracle_cc": oracle_cc,
        "time_to_oracle_s": None if reached is None else reached[1],
        "epoch_to_oracle": None if reached is None else reached[0],
        "early_stopping_epoch": best_epoch,
        "cc_near_early_stopping": nearest[2],
        "max_cc": max(c[2] for c in curve),
        "max_cc_epoch": max(curve, key=lambda c: c[2])[0],
        "curve": [{"epoch": e, "fit_s": s, "cc": c} for e, s, c in curve],
        "machine": {"threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__},
    }
    print(json.dumps(result, indent=1))
    if args.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([c[0] for c in curve], [c[2] for c in curve], "o-", ms=3, label="icetide (current state)")
        ax.axhline(oracle_cc, color="k", ls="--", label=f"FBP oracle ({oracle_cc:.3f})")
        ax.axvline(best_epoch, color="tab:red", ls=":", label=f"early stopping (epoch {best_epoch})")
        ax.set_xlabel("epoch (one Adam step over all 41 tilts)")
        ax.set_ylabel("CC with the truth")
        ax.set_title("128 x 128 x 48, 41 tilts, 10 dB, paper profile")
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
