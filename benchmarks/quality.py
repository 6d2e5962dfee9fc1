"""Reconstruction quality against the truth: the quality bar of the engine issue.

Usage: ``python benchmarks/quality.py [--minutes 8] [--out DIR] [--seed 0] [--blobs] [--profile paper|hard|drift]
[--snr-db 10] [--dose COUNTS] [--defocus-um 3] [--exposure 120] [--voxel-size 10] [--set fit.lr_shift_px=0.1 ...]``

A 128 x 128 x 48 crowded phantom built from the real protein maps of ``../shared/data/proteins/maps_10A``
(``--blobs``: Gaussian blobs instead, no shared data needed), 41 tilts from -60 to +60 degrees, the paper's
deformation profile, 10 dB; icetide with the default settings (plus any ``--set`` overrides) and a fitting
budget of ``--minutes``, then the FBP baselines, all scored by :func:`icetide.evaluation.evaluate_volumes`
(registration to the truth, FSC with a 4-voxel edge taper). This is :func:`icetide.demo.run_demo` at the
benchmark's settings.

Prints one JSON object: CC and FSC-0.5 / 0.143 resolution (voxels) per method, the ratios the bar asks for
(``icetide_cc / fbp_oracle_cc`` >= 1 and ``fbp_aligned_cc / fbp_oracle_cc`` >= 0.95), the deformation errors
(shift RMS after the gauge, rotation MAE, local-field error against the true field's mean size), the fit's
epochs and stop reason, and the wall time of each stage. Exits 3 with a message when the protein maps are
absent and ``--blobs`` is not given.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from icetide.config import ReconstructConfig, parse_config
from icetide.demo import DemoSettings, run_demo
from icetide.experiments.case import Acquisition

PROTEINS = Path(__file__).resolve().parents[2] / "shared" / "data" / "proteins" / "maps_10A"


def _overrides(pairs: list[str]) -> dict:
    data: dict = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        node = data
        *parents, leaf = key.split(".")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = yaml.safe_load(value)
    return data


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=8.0, help="fitting budget (the bar allows 10 min in all)")
    parser.add_argument("--out", type=Path, default=None, help="keep the outputs here (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128, help="phantom width/height; thickness 3/8 of it")
    parser.add_argument("--blobs", action="store_true", help="Gaussian-blob proteins (no shared data needed)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--profile", default="paper", choices=["paper", "hard", "drift"], help="deformation profile")
    parser.add_argument("--snr-db", type=float, default=10.0, help="SNR of the simulated series, dB")
    parser.add_argument("--dose", type=float, default=None, help="Poisson noise at this mean count per pixel instead")
    parser.add_argument("--defocus-um", type=float, default=None, help="simulate the CTF at this nominal defocus")
    parser.add_argument("--exposure", type=float, default=0.0, help="radiation damage: total exposure, e/A^2")
    parser.add_argument("--voxel-size", type=float, default=10.0, help="phantom voxel (= pixel) size, A")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="config override key=value")
    args = parser.parse_args()
    if not args.blobs and not PROTEINS.is_dir():
        print(f"skipped: {PROTEINS} is absent (use --blobs)", file=sys.stderr)
        sys.exit(3)

    settings = DemoSettings(
        shape_zyx=(args.size * 3 // 8, args.size, args.size),
        max_minutes=args.minutes,
        epochs=100_000,
        acquisition=Acquisition(snr_db=args.snr_db, profile=args.profile, seed=args.seed, dose_per_px=args.dose,
                                defocus_um=args.defocus_um, exposure_e_per_A2=args.exposure),
        device=args.device,
        voxel_size_A=args.voxel_size,
        proteins_dir=None if args.blobs else str(PROTEINS),
    )
    base = ReconstructConfig(thickness=settings.shape_zyx[0], pixel_size_A=settings.voxel_size_A)
    data = base.model_dump(mode="json")
    data["fit"].update(epochs=settings.epochs, max_minutes=args.minutes, seed=args.seed, device=args.device)
    config = parse_config(_merge(data, _overrides(args.sets)), "--set")

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        summary = run_demo(out, settings, config=config)
    total_s = time.monotonic() - t0

    recs = summary["reconstructions"]
    oracle = recs["fbp_oracle"]["cc"]
    d = summary["deformations"]
    result = {
        "benchmark": "quality",
        "phantom": "blobs" if args.blobs else "protein maps (shared/data/proteins/maps_10A)",
        "shape_zyx": list(settings.shape_zyx),
        "n_tilts": summary["settings"]["n_tilts"],
        "snr_db": settings.acquisition.snr_db,
        "dose_per_px": args.dose,
        "defocus_um": args.defocus_um,
        "exposure_e_per_A2": args.exposure,
        "voxel_size_A": args.voxel_size,
        "profile": settings.acquisition.profile,
        "overrides": args.sets,
        "methods": {
            name: {
                "cc": r["cc"],
                "fsc05_vox": r["fsc"]["resolution"]["0.5"]["voxels"],
                "fsc0143_vox": r["fsc"]["resolution"]["0.143"]["voxels"],
            }
            for name, r in recs.items()
        },
        "icetide_over_oracle_cc": recs["icetide"]["cc"] / oracle,
        "fbp_aligned_over_oracle_cc": recs["fbp_aligned"]["cc"] / oracle,
        "shift_rms_px": d["shift_rms_px"],
        "rotation_mae_deg": d["rotation_mae_deg"],
        "local_mean_error_px": d["local_mean_error_px"],
        "local_true_mean_px": d["local_true_mean_px"],
        "fit": summary["fit"],
        "timings_s": {**summary["timings_s"], "total_s": total_s},
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
