"""``icetide demo``: simulate, reconstruct, compare with FBP and report, on a built-in phantom."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import Progress

from ..errors import IcetideError
from ..runlog import run_log
from .common import check_output_dir, console, one_line_errors, output_dir, say
from .evaluate_cmd import deformation_summary, results_table
from .reconstruct_cmd import progress_printer


@one_line_errors
def demo(
    out: Path = typer.Option(Path("demo_out"), "--out", "-o", help="Output folder (created; must be empty unless --force)."),
    minutes: float = typer.Option(3.0, help="Time budget of the icetide fit, minutes."),
    size: int = typer.Option(128, help="Phantom width and height in voxels (thickness: 3/8 of it)."),
    seed: int = typer.Option(0, help="Random seed of the phantom, the deformations, the noise and the fit."),
    device: str = typer.Option("auto", help="auto (CUDA if available), cpu, cuda or cuda:N."),
    force: bool = typer.Option(False, "--force", help="Replace the contents of a non-empty output folder."),
) -> None:
    """Run icetide end to end on a built-in phantom, no data needed.

    Generates a crowded phantom (membranes, filaments, proteins), simulates a 41-tilt series (-60..60 degrees,
    step 3) with the paper's deformations at 10 dB, reconstructs it with icetide, runs FBP of the raw, the
    icetide-aligned and an undeformed (oracle) series and SIRT of the aligned and the undeformed series, and scores everything
    against the truth: CC, FSC, deformation errors. Writes OUT/summary.json, figures (fsc.png, orthoslices.png, fourier_slices.png,
    deformation_errors.png, local_fields.png), the volumes and OUT/icetide/ (the reconstruction's outputs).
    """
    from ..demo import DemoSettings, run_demo
    from ..experiments.case import Acquisition

    if minutes <= 0:
        raise IcetideError(f"--minutes must be positive, got {minutes:g}")
    if not 32 <= size <= 1024:
        raise IcetideError(f"--size must lie in [32, 1024] voxels, got {size}")
    settings = DemoSettings(shape_zyx=(max(8, size * 3 // 8), size, size), acquisition=Acquisition(seed=seed),
                            max_minutes=minutes, device=device)
    from ..runtime import resolve_device

    resolve_device(device)
    check_output_dir(out, force)
    with output_dir(out, force) as folder, run_log(folder):
        progress, on_epoch = progress_printer(settings.epochs, minutes)
        bar = progress if isinstance(progress, Progress) else None  # plain lines when not on a terminal
        started = {"fit": False}

        def on_phase(name: str) -> None:
            if name == "fitting" and not started["fit"]:
                started["fit"] = True
                if bar is not None:
                    bar.start()
            elif started["fit"] and bar is not None and bar.live.is_started:
                bar.stop()
            say(f"[dim]{name}[/]")

        try:
            summary = run_demo(folder, settings, on_phase=on_phase, on_epoch=on_epoch)
        finally:
            if bar is not None and bar.live.is_started:
                bar.stop()
        console.print(results_table(summary["reconstructions"], settings.voxel_size_A))
        say(deformation_summary(summary["deformations"]))
        fit = summary["fit"]
        say(f"icetide fit: {fit['epochs']} epochs in {fit['fit_seconds']:.0f} s on {fit['device']} "
            f"({fit['stop_reason']})")
        say(f"done: {out}/summary.json, figures and volumes in {out}")
