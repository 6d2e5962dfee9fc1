"""Experiment ``volumes`` (paper Fig. 10): CC of each method across phantoms and simulation seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..plots import plot_bars
from .case import METHODS, run_case
from .report import markdown_table, write_report
from .settings import machine_info, phantoms


def run(
    settings, out_dir: Path, phase: Callable[[str], None], on_epoch: Callable[[dict], None] | None = None
) -> dict:

    # Given phantoms are read once and simulated with every seed; without them each seed makes its own phantom.
    given = phantoms(settings) if settings.phantoms else None
    cases: dict[str, dict] = {}
    sources: dict[str, str] = {}
    for seed in settings.seeds:
        for phantom in given or phantoms(settings, seed=seed):
            label = f"{phantom.name}_seed{seed}"
            phase(label)
            folder = out_dir / label
            folder.mkdir(exist_ok=True)
            config = settings.reconstruction_config(phantom, seed)
            cases[label] = run_case(phantom.volume, phantom.voxel_size_A, settings.acquisition(seed=seed), config,
                                    folder, phase, on_epoch)
            sources[phantom.name] = f"{phantom.source}, {' x '.join(map(str, phantom.volume.shape[::-1]))} voxels"
    labels = sorted(cases)
    cc = {m: [cases[k]["reconstructions"][m]["cc"] for k in labels] for m in METHODS}
    plot_bars(labels, cc, out_dir / "cc_by_volume.png", "CC with the truth")
    rows = [(k, *(cases[k]["reconstructions"][m]["cc"] for m in METHODS)) for k in labels]
    rows.append(("mean", *(float(np.mean(cc[m])) for m in METHODS)))
    wins = sum(cases[k]["reconstructions"]["icetide"]["cc"] > cases[k]["reconstructions"]["fbp_oracle"]["cc"]
               for k in labels)
    body = (
        "Phantoms:\n\n" + "\n".join(f"- `{n}`: {s}" for n, s in sources.items())
        + f"\n\nSeeds {', '.join(map(str, settings.seeds))} (deformations, noise and fit); paper profile, "
        f"{settings.acquisition().snr_db:g} dB.\n\nCC with the truth:\n\n" + markdown_table(("case", *METHODS), rows)
        + f"\n\nicetide above the FBP oracle in {wins} of {len(labels)} cases.\n\n"
        "![CC of each method per volume and seed (Fig. 10)](cc_by_volume.png)\n"
    )
    return write_report(out_dir, "volumes", settings, machine_info(settings.device),
                        {"phantoms": sources, "cases": cases}, body)
