"""``icetide batch``: reconstruct many tilt series on a Dask cluster, skipping finished ones."""

from __future__ import annotations

import csv
import importlib
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import IcetideError
from .common import console, one_line_errors
from .reconstruct_cmd import build_config


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
    from ..io import atomic_path, write_json

    write_json(out / "batch_summary.json", rows)
    with atomic_path(out / "batch_summary.csv") as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["name", "status", "seconds", "epochs", "cc", "stack"])
            writer.writeheader()
            writer.writerows(rows)


@one_line_errors
def batch(
    inputs: List[str] = typer.Argument(
        ..., help="Tilt series: stack files (.mrc/.st with .tlt/.rawtlt or .mdoc beside them), folders, glob "
        "patterns, text files listing stacks, or RELION-5 tomograms.star files."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: one subfolder per series (finished ones are skipped)."),
    workers: Optional[int] = typer.Option(None, help="Local workers (default: one per GPU, else 1)."),
    scheduler: Optional[str] = typer.Option(
        None, help="Address of a running Dask scheduler (e.g. of a dask-jobqueue SLURM cluster) instead of a local one."
    ),
    retries: int = typer.Option(1, help="Times a failed series is tried again."),
    config: Optional[Path] = typer.Option(None, help="YAML settings for every series (see config.yaml of a run)."),
    thickness: Optional[int] = typer.Option(None, help="Tomogram thickness in voxels (default: half the smaller side)."),
    pixel_size: Optional[float] = typer.Option(None, help="Pixel size in Angstrom (default: each file's header)."),
    epochs: Optional[int] = typer.Option(None, help="Maximum epochs per series (default 500, early stopping)."),
    max_minutes: Optional[float] = typer.Option(None, help="Fitting time budget per series, minutes."),
    device: str = typer.Option("auto", help="auto (each worker its GPU, else CPU), cpu, cuda or cuda:N."),
) -> None:
    """Reconstruct many tilt series with icetide on a Dask cluster.

    Each series gets OUT/NAME/ with every output of icetide reconstruct; a series whose folder holds a
    report.json is skipped, so an interrupted batch continues where it stopped. A failed series is retried
    (--retries) and then reported; it never stops the others. Ends with a summary table (status, time, epochs,
    CC against truth/volume.mrc when the series came from icetide simulate), also in OUT/batch_summary.csv and
    .json; exits 1 when any series failed. Needs dask's distributed: pip install 'icetide[batch]'.
    """
    from ..batch import find_items, run_batch
    from ..fit import resolve_device

    _require_distributed()
    if retries < 0:
        raise IcetideError(f"--retries must be 0 or more, got {retries}")
    if workers is not None and workers < 1:
        raise IcetideError(f"--workers must be at least 1, got {workers}")
    if out.exists() and not out.is_dir():
        raise IcetideError(f"{out}: exists and is not a folder")
    resolve_device(device)
    cfg = build_config(config, None, {"thickness": thickness, "pixel_size_A": pixel_size, "fit.epochs": epochs,
                                      "fit.max_minutes": max_minutes, "fit.device": device})
    items = find_items(inputs)
    started = time.monotonic()
    client, cluster, where = _cluster(workers, scheduler, device)
    console.print(f"{len(items)} tilt series on a {where}; outputs in {out}/")
    try:
        def report(row: dict) -> None:
            elapsed = time.monotonic() - started
            console.print(f"[dim]{elapsed:7.0f} s[/]  {escape(row['name'])}: {escape(row['status'])}", highlight=False)

        rows = run_batch(items, out, cfg, client, retries, report)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    _write_summary(out, rows)
    table = Table(title=f"icetide batch: {len(rows)} series in {time.monotonic() - started:.0f} s")
    for column in ("series", "status", "time (s)", "epochs", "CC"):
        table.add_column(column)
    for r in rows:
        table.add_row(escape(r["name"]), escape(r["status"]), "-" if r["seconds"] is None else f"{r['seconds']:.0f}",
                      "-" if r["epochs"] is None else str(r["epochs"]), "-" if r["cc"] is None else f"{r['cc']:.3f}")
    console.print(table)
    if any(r["status"].startswith("failed") for r in rows):
        raise typer.Exit(code=1)
