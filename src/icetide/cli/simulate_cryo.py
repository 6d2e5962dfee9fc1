"""``icetide simulate --profile cryo``: a tilt series as the microscope records it (:mod:`icetide.simulate.cryo`)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

import yaml

from .. import __version__
from ..simulate.cryo import CryoAcquisition
from ..errors import IcetideError
from .common import check_output_dir, console, output_dir


def cryo_settings(file: Optional[Path], **given) -> CryoAcquisition:
    """The acquisition: :class:`CryoAcquisition` defaults, then the YAML ``file``'s keys, then the options
    ``given`` that are not None."""
    from ..ctf import Microscope

    values: dict = {}
    if file is not None:
        if not file.is_file():
            raise IcetideError(f"{file}: no such settings file")
        loaded = yaml.safe_load(file.read_text()) or {}
        if not isinstance(loaded, dict):
            raise IcetideError(f"{file}: expected a mapping of acquisition settings")
        known = {f.name for f in dataclasses.fields(CryoAcquisition)}
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise IcetideError(f"{file}: unknown acquisition setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values.update(loaded)
        if isinstance(values.get("microscope"), dict):
            values["microscope"] = Microscope(**values["microscope"])
        for key in ("field_of_view", "local_grid"):
            if key in values:
                values[key] = tuple(values[key])
    values.update({k: v for k, v in given.items() if v is not None})
    return CryoAcquisition(**values)


def simulate_cryo_command(
    volume: Optional[Path], out: Path, settings: CryoAcquisition, seed: int,
    proteins: Optional[Path], force: bool,
) -> None:
    """Simulate, write the series as a microscope would and its truth, and report."""
    from ..io import read_volume, write_json
    from ..simulate.cryo import cryo_specimen, simulate_cryo, write_cryo

    started = time.perf_counter()
    check_output_dir(out, force)
    if volume is not None:
        specimen, _ = read_volume(volume)
        source = str(volume)
    else:
        if proteins is not None and not proteins.is_dir():
            raise IcetideError(f"--proteins {proteins}: no such folder")
        console.print(f"generating a crowded specimen {settings.specimen_thickness_A:g} A thick"
                      + (f" with the protein maps of {proteins}" if proteins else " (Gaussian-blob proteins)"))
        specimen = cryo_specimen(settings, seed, proteins)
        source = f"crowded phantom, seed {seed}" + (f", proteins from {proteins}" if proteins else ", blobs")
    angles = settings.tilt_angles_deg()
    console.print(f"recording {len(angles)} tilts of a {specimen.shape} specimen over a "
                  f"{settings.field_of_view[0]} x {settings.field_of_view[1]} field at {settings.pixel_size_A:g} A/px, "
                  f"seed {seed}")
    step = max(1, len(angles) // 4)

    def on_view(stage: str, i: int) -> None:
        if (i + 1) % step == 0 or i + 1 == len(angles):
            console.print(f"  {stage}: {i + 1}/{len(angles)} views")

    sim = simulate_cryo(specimen, settings, seed, on_view)
    with output_dir(out, force) as folder:
        truth = write_cryo(folder, sim)
        write_json(folder / "simulation.json", {
            "command": "simulate",
            "profile": "cryo",
            "icetide_version": __version__,
            "specimen": source,
            "specimen_shape_zyx": list(specimen.shape),
            "seed": seed,
            "acquisition": dataclasses.asdict(settings),
            "tilt_angles_deg": angles,
            "truth": truth,
            "timings_s": {**sim.timings_s, "total": time.perf_counter() - started},
        })
    console.print(
        f"done: {out}/tilt_series.mrc {tuple(sim.counts.shape)} in counts ({sim.level_0_counts:.4g} at 0 deg), "
        f"specimen contrast SNR {sim.snr_db_measured:.2f} dB; .mdoc, .tlt, .defocus beside it; truth in {out}/truth"
    )
