"""``icetide experiment``: the paper's experiments, one command each."""

from __future__ import annotations

import math
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import IcetideError
from ..runlog import run_log
from .common import check_output_dir, console, one_line_errors, output_dir, say, warn

EPOCH_REPORT_EVERY = 25


def parse_numbers(text: str, option: str, kind=float) -> tuple:
    """``"a,b,c"`` -> a tuple of numbers (``kind``); a one-line error names ``option`` otherwise."""
    try:
        values = tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise IcetideError(f"{option}: expected comma-separated numbers, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise IcetideError(f"{option}: expected comma-separated finite numbers, got {text!r}")
    if len(set(values)) != len(values):
        raise IcetideError(f"{option}: repeated value in {text!r}")
    return values


@one_line_errors
def experiment(
    name: str = typer.Argument(..., help="single, timing, noise, epochs or volumes."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (created; must be empty unless --force)."),
    phantom: Optional[List[Path]] = typer.Option(
        None, "--phantom", help="Ground-truth MRC volume (.mrc.gz too); repeat for several (volumes uses all, the "
        "others the first). Default: a generated crowded phantom."
    ),
    full: bool = typer.Option(
        False, "--full", help="Paper scale (unbinned phantoms, 61 tilts at 2 degrees); meant for a GPU. Default: "
        "phantoms binned to at most 128 voxels across, 41 tilts at 3 degrees."
    ),
    seed: int = typer.Option(0, help="Seed of the simulation and the fit."),
    seeds: str = typer.Option("0,1", help="volumes: comma-separated simulation seeds."),
    snrs: str = typer.Option("-20,-10,0,10,20,30", "--snrs", help="noise: comma-separated SNRs in dB."),
    epochs: Optional[int] = typer.Option(
        None, help="Epoch limit of each fit (default 500 with early stopping; epochs: 250 without)."
    ),
    minutes: Optional[float] = typer.Option(None, help="Time budget of each fit, minutes (default: none)."),
    every: int = typer.Option(5, help="epochs: score the volume every this many epochs."),
    device: str = typer.Option("auto", help="auto (CUDA if available), cpu, cuda or cuda:N."),
    force: bool = typer.Option(False, "--force", help="Replace the contents of a non-empty output folder."),
) -> None:
    """Re-run one of the ICE-TIDE paper's experiments on simulated data with known truth.

    single (Figs. 4-7): icetide, FBP and SIRT of the icetide-aligned series, FBP of the raw series and the FBP
    oracle on one volume: FSC, CC, orthoslices, Fourier slices, local fields, deformation errors. timing
    (Table I): wall time and peak memory of icetide (lattice and rays renderers), FBP, SIRT and the coarse
    pre-alignment. noise (Fig. 8): CC of every method for each SNR of --snrs. epochs (Fig. 9): CC along the
    fit with the FBP-oracle line and the early-stopping epoch. volumes (Fig. 10): CC of every method for each
    phantom and seed.

    Writes in OUT: summary.md (the command, the machine, tables, figure links), results.json, the figures
    with their CSV/JSON, and each case's volumes.
    """
    from ..experiments import EXPERIMENTS, ExperimentSettings, run_experiment
    from ..runtime import resolve_device

    if name not in EXPERIMENTS:
        raise IcetideError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    for path in phantom or []:
        if not path.is_file():
            raise IcetideError(f"{path}: no such file")
    if epochs is not None and epochs < 1:
        raise IcetideError(f"--epochs must be at least 1, got {epochs}")
    if minutes is not None and not (math.isfinite(minutes) and minutes > 0):
        raise IcetideError(f"--minutes must be positive, got {minutes:g}")
    if every < 1:
        raise IcetideError(f"--every must be at least 1, got {every}")
    resolve_device(device)
    settings = ExperimentSettings(
        phantoms=tuple(str(p) for p in phantom or ()),
        full=full,
        seed=seed,
        seeds=parse_numbers(seeds, "--seeds", int),
        snrs_db=parse_numbers(snrs, "--snrs"),
        epochs=epochs,
        max_minutes=minutes,
        every=every,
        device=device,
        command="icetide " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    check_output_dir(out, force)
    started = time.monotonic()

    def on_phase(text: str) -> None:
        say(f"[dim]{time.monotonic() - started:7.0f} s[/]  {text}")

    def on_epoch(info: dict) -> None:
        if info["epoch"] == 1 or info["epoch"] % EPOCH_REPORT_EVERY == 0:
            val = "-" if math.isnan(info["val_loss"]) else f"{info['val_loss']:.4f}"
            on_phase(f"  epoch {info['epoch']}: loss {info['train_loss']:.4f}, held-out {val}")

    with output_dir(out, force) as folder, run_log(folder):
        if full and resolve_device(device).type == "cpu":
            warn("--full on a CPU takes many hours per fit")
        run_experiment(name, folder, settings, on_phase, on_epoch)
        console.print((out / "summary.md").read_text(), highlight=False, markup=False)
        say(f"done in {time.monotonic() - started:.0f} s: {out}/summary.md, results.json and figures")
