"""``icetide batch``: reconstruct many tilt series on a Dask cluster, skipping finished ones."""

from __future__ import annotations

import csv
import importlib
import time
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import IcetideError
from .common import console, one_line_errors
from .reconstruct_cmd import build_config, option_flags
from .reconstruct_options import (
    BinOption, EpochsOption, InvertOption, MaxMinutesOption, PixelSizeOption, PolarityOption, ThicknessOption,
)

# The options of batch; those that mean for every series what reconstruct's mean for one (--thickness, --bin,
# --pixel-size, --epochs, --max-minutes, --invert, --polarity) are reconstruct's (reconstruct_options.py).
InputsArg = Annotated[List[str], typer.Argument(
    help="Tilt series: stack files (.mrc/.st with .tlt/.rawtlt or .mdoc beside them), SerialEM .mdoc files (the "
        "stack beside each: X.mrc for X.mrc.mdoc, X.mrc or X.st for X.mdoc, else the mdoc's ImageFile), folders, glob "
        "patterns, text files listing stacks or mdocs, or RELION-5 tilt-series STAR files (one series per "
        "rlnTomoName, in OUT/<rlnTomoName>/: a project job's, e.g. CtfFind/job003/tilt_series_ctf.star, with its "
        "optics, defocus and pre-exposure, or icetide's own tomograms.star).")]
OutOption = Annotated[Path, typer.Option(
    "--out", "-o", help="Output folder: one subfolder per series (finished ones are skipped).")]
WorkersOption = Annotated[Optional[int], typer.Option(help="Local workers (default: one per GPU, else 1).")]
SchedulerOption = Annotated[Optional[str], typer.Option(
    help="Address of a running Dask scheduler (e.g. of a dask-jobqueue SLURM cluster) instead of a local one.")]
RetriesOption = Annotated[int, typer.Option(help="Times a failed series is tried again.")]
ConfigOption = Annotated[Optional[Path], typer.Option(
    help="YAML settings for every series (see config.yaml of a run).")]
DeviceOption = Annotated[str, typer.Option(help="auto (each worker its GPU, else CPU), cpu, cuda or cuda:N.")]
ExcludeOption = Annotated[Optional[str], typer.Option(
    help="Views to leave out of every series, 0-based stack indices and ranges as icetide reconstruct --exclude "
        "(e.g. 0-2,40). A series they do not fit fails with the reason.")]
ExposureWeightingOption = Annotated[bool, typer.Option(
    "--exposure-weighting", help="Weight each view's spectrum by its accumulated exposure, from the series' .mdoc "
        "(PriorRecordDose or ExposureDose); a series without an .mdoc is not weighted (report.json).")]
NoSideFilesOption = Annotated[bool, typer.Option(
    "--no-side-files", help="Ignore the files beside each stack with its stem: <stem>.xf (IMOD) or <stem>.aln "
        "(AreTomo) as the starting alignment (as --xf/--aln; the .xf when both), <stem>_CTF.txt, <stem>_ctf.txt "
        "(CTFFIND) or <stem>.defocus (IMOD) as the per-view defocus (as --defocus: phase-flipped).")]

# The settings the options of batch set to their own value (dotted setting -> parameter name).
BATCH_OPTIONS = {"thickness": "thickness", "bin": "bin", "pixel_size_A": "pixel_size", "polarity": "polarity",
                 "fit.epochs": "epochs", "fit.max_minutes": "max_minutes", "fit.device": "device"}


def _require_distributed() -> None:
    """Fail in one line, before any work, where dask's distributed is missing: it is an extra, not a dependency."""
    try:
        importlib.import_module("distributed")
    except ImportError as exc:
        raise IcetideError(f"icetide batch needs dask's distributed ({exc}): pip install 'icetide[batch]'") from None


def _cluster(workers: Optional[int], scheduler: Optional[str], device: str):
    """A Dask client: of ``scheduler`` when given, else of a new LocalCluster (one worker per GPU, or
    ``workers`` CPU workers sharing the cores). Returns ``(client, cluster or None, description)``."""
    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="20s")
        except OSError as exc:
            raise IcetideError(f"--scheduler {scheduler}: cannot connect ({exc})") from None
        return client, None, f"scheduler {scheduler}"
    import os

    import torch

    gpus = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    n = workers or gpus or 1
    threads = max(1, (os.cpu_count() or 1) // n)
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                           env={"OMP_NUM_THREADS": str(threads)})
    return Client(cluster), cluster, f"local cluster of {n} worker(s)" + (f" ({gpus} GPU)" if gpus else "")


def _write_summary(out: Path, rows: list[dict]) -> None:
    """``batch_summary.json`` (every column), ``batch_summary.csv`` (the outcome) and ``batch_metrics.csv`` (the
    quality metrics), one row per series."""
    from ..batch import QC_COLUMNS
    from ..io import atomic_path, write_json

    write_json(out / "batch_summary.json", rows)
    tables = {"batch_summary.csv": ["name", "status", "seconds", "epochs", "cc", "stack", "side_files"],
              "batch_metrics.csv": ["name", "status", *QC_COLUMNS, "side_files"]}
    for name, columns in tables.items():
        with atomic_path(out / name) as tmp:
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)


def _shown(value: object, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def _print_tables(rows: list[dict], seconds: float) -> None:
    """The outcome of every series, then its quality metrics (as in batch_metrics.csv)."""
    table = Table(title=f"icetide batch: {len(rows)} series in {seconds:.0f} s")
    for column in ("series", "status", "time (s)", "CC", "side files"):
        table.add_column(column)
    for r in rows:
        table.add_row(escape(r["name"]), escape(r["status"]), _shown(r["seconds"], ".0f"), _shown(r["cc"], ".3f"),
                      escape(r["side_files"]) or "-")
    console.print(table)
    qc = Table(title="quality (batch_metrics.csv)", caption="val loss: best held-out loss; e/o FSC: even/odd-tilt "
               "FSC score of the alignment kept; 0.143: half-map resolution, A; beads: gold beads followed, their mean "
               "residual (px); axis: tilt axis, deg from Y; shifts: range of the per-view shifts, px")
    columns = {"views": ("n_views", ""), "bin": ("bin", ""), "val loss": ("val_loss", ".4g"),
               "e/o FSC": ("even_odd_fsc", ".3f"), "0.143": ("half_map_fsc143_A", ".1f"), "beads": ("beads", ""),
               "bead res.": ("bead_residual_px", ".2f"),
               "axis": ("tilt_axis_deg", ".2f"), "shifts": ("shift_range_px", ".1f"), "epochs": ("epochs", ""),
               "fit (s)": ("fit_seconds", ".0f")}
    qc.add_column("series", no_wrap=True)
    for column in columns:
        qc.add_column(column, justify="right")
    for r in rows:
        qc.add_row(escape(r["name"]), *(_shown(r[key], spec) for key, spec in columns.values()))
    console.print(qc)


@one_line_errors
def batch(
    inputs: InputsArg,
    out: OutOption,
    workers: WorkersOption = None,
    scheduler: SchedulerOption = None,
    retries: RetriesOption = 1,
    config: ConfigOption = None,
    thickness: ThicknessOption = None,
    bin: BinOption = None,
    pixel_size: PixelSizeOption = None,
    epochs: EpochsOption = None,
    max_minutes: MaxMinutesOption = None,
    device: DeviceOption = "auto",
    exclude: ExcludeOption = None,
    invert: InvertOption = False,
    polarity: PolarityOption = None,
    exposure_weighting: ExposureWeightingOption = False,
    no_side_files: NoSideFilesOption = False,
) -> None:
    """Reconstruct many tilt series with icetide on a Dask cluster.

    Each series gets OUT/NAME/ with every output of icetide reconstruct; a series whose folder holds a
    report.json is skipped, so an interrupted batch continues where it stopped. A failed series is retried
    (--retries) and then reported; it never stops the others. The side files found beside each stack are
    used (see --no-side-files) and listed per series. Ends with a summary table (status, time, CC against
    truth/volume.mrc when the series came from icetide simulate, side files), in OUT/batch_summary.csv, and a
    quality table, in OUT/batch_metrics.csv: views, binning, pixel size, the fit's best held-out loss, the
    even/odd-tilt FSC score of the alignment kept, the half-map resolution at FSC 0.143 (with --config
    fit.half_maps), the gold beads followed and their mean residual, tilt axis, range of the per-view shifts,
    epochs and fitting time; both in
    OUT/batch_summary.json. Exits 1 when any series failed. Needs dask's distributed: pip install 'icetide[batch]'.
    """
    from ..batch import find_items, run_batch
    from ..runtime import resolve_device

    _require_distributed()
    if retries < 0:
        raise IcetideError(f"--retries must be 0 or more, got {retries}")
    if workers is not None and workers < 1:
        raise IcetideError(f"--workers must be at least 1, got {workers}")
    if out.exists() and not out.is_dir():
        raise IcetideError(f"{out}: exists and is not a folder")
    resolve_device(device)
    given = locals()
    overrides = {key: given[name] for key, name in BATCH_OPTIONS.items()}
    overrides["ctf.exposure_weighting"] = True if exposure_weighting else None
    cfg = build_config(config, None, overrides, option_flags(BATCH_OPTIONS))
    items = find_items(inputs, side_files=not no_side_files)
    started = time.monotonic()
    client, cluster, where = _cluster(workers, scheduler, device)
    console.print(f"{len(items)} tilt series on a {where}; outputs in {out}/")
    try:
        def report(row: dict) -> None:
            elapsed = time.monotonic() - started
            console.print(f"[dim]{elapsed:7.0f} s[/]  {escape(row['name'])}: {escape(row['status'])}", highlight=False)

        rows = run_batch(items, out, cfg, client, retries, report, invert, exclude)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    _write_summary(out, rows)
    _print_tables(rows, time.monotonic() - started)
    if any(r["status"].startswith("failed") for r in rows):
        raise typer.Exit(code=1)
