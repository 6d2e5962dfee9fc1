"""``icetide simulate``: a realistic tilt series of a known volume, with the truth kept for evaluation."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Callable, Iterator, Optional

import numpy as np
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .. import __version__
from ..errors import IcetideError
from .common import ForceOption, check_output_dir, console, one_line_errors, output_dir

DEFAULT_VOXEL_SIZE_A = 10.0


def tilt_range(tilt_min_deg: float, tilt_max_deg: float, tilt_step_deg: float) -> np.ndarray:
    """Tilt angles ``tilt_min, tilt_min + step, ...`` up to ``tilt_max`` (inclusive), validated; degrees."""
    values = (tilt_min_deg, tilt_max_deg, tilt_step_deg)
    if not all(math.isfinite(v) for v in values):
        raise IcetideError("tilt range values must be finite numbers")
    if tilt_step_deg <= 0:
        raise IcetideError(f"--tilt-step must be positive, got {tilt_step_deg:g}")
    if not -90 < tilt_min_deg <= tilt_max_deg < 90:
        raise IcetideError(
            f"tilt range must satisfy -90 < --tilt-min <= --tilt-max < 90, got {tilt_min_deg:g} to {tilt_max_deg:g}"
        )
    n = int(math.floor((tilt_max_deg - tilt_min_deg) / tilt_step_deg + 1e-9)) + 1
    return np.round(tilt_min_deg + tilt_step_deg * np.arange(n), 9)


def _voxel_size(override_A: Optional[float], header_A: Optional[float]) -> tuple[float, str]:
    """Input voxel size in Angstrom and where it came from."""
    if override_A is not None:
        return override_A, "--pixel-size"
    if header_A is not None:
        return header_A, "MRC header"
    source = f"default: neither --pixel-size nor the MRC header gives one, {DEFAULT_VOXEL_SIZE_A:g} A assumed"
    return DEFAULT_VOXEL_SIZE_A, source


def _load_volume(path: Path, bin_factor: int) -> tuple[np.ndarray, tuple[int, ...], Optional[float]]:
    """Read and check the truth volume; returns ``(volume, input_shape, header_voxel_size_A)``."""
    from ..io import read_volume

    volume, header_A = read_volume(path)
    if min(volume.shape) // bin_factor < 2:
        raise IcetideError(f"--bin {bin_factor} leaves fewer than 2 voxels per axis of a {volume.shape} volume")
    if not volume.any():
        raise IcetideError(f"{path}: the volume is all zeros")
    return volume, volume.shape, header_A


VolumeArg = Annotated[Optional[Path], typer.Argument(
    help="Ground-truth density, MRC volume (nz, ny, nx); any MRC mode, .mrc.gz too. With --profile cryo "
        "optional (default: a generated crowded specimen) and wider than the field of view.")]
OutOption = Annotated[Path, typer.Option("--out", "-o", help="Output folder (created; must be empty unless --force).")]
ProfileOption = Annotated[str, typer.Option(
    help="Deformations: paper (shifts +-6 px, rotations +-0.01 deg, 2-px local fields), hard "
        "(+-20 px, +-0.5 deg plus a common +-1 deg tilt-axis offset, 4-px local fields) or drift (hard, with the "
        "shifts a random walk along the tilt angles, as stage drift in a continuous scheme), or cryo: the series "
        "as a microscope records it (counts on a per-tilt level, dark density, gold beads, dose-symmetric drift, "
        "CTF, damage, an off-centre specimen wider than the field; with an .mdoc and a defocus file; "
        "docs/CONVENTIONS.md \"Simulated cryo-ET acquisition\").")]
SnrDbOption = Annotated[Optional[float], typer.Option(
    "--snr-db", help="SNR in dB: 10 log10(sum(y^2)/sum(noise^2)) over the clean series (default 10). "
        "With --profile cryo: the specimen's contrast SNR, which sets the counts level (default: 50 counts).")]
DoseOption = Annotated[Optional[float], typer.Option(
    help="Counting noise instead of --snr-db: Poisson draws with this mean count per pixel (the series "
        "are written in counts). With --profile cryo: the counts at 0 degrees.")]
TiltMinOption = Annotated[float, typer.Option(help="First tilt angle, degrees.")]
TiltMaxOption = Annotated[float, typer.Option(help="Last tilt angle (inclusive), degrees.")]
TiltStepOption = Annotated[float, typer.Option(help="Tilt increment, degrees.")]
BinFactorOption = Annotated[int, typer.Option("--bin", help="Average-pool the volume by this integer factor first.")]
SeedOption = Annotated[int, typer.Option(help="Random seed; the same seed gives identical outputs.")]
PixelSizeOption = Annotated[Optional[float], typer.Option(
    help="Voxel size of the input volume in Angstrom (overrides the header; default header, else 10).")]
CtfOption = Annotated[bool, typer.Option(
    "--ctf", help="Apply the CTF (defocus varying across each tilted image and through the specimen's "
        "depth); writes the true per-tilt defocus as tilt_series.defocus (IMOD).")]
DefocusOption = Annotated[Optional[float], typer.Option(
    help="With --ctf: nominal defocus, micrometres of underfocus (default 3; cryo 4).")]
DefocusSpreadOption = Annotated[Optional[float], typer.Option(
    help="With --ctf: each tilt's defocus is the nominal one plus a uniform draw within +-this, "
        "micrometres (default 0.2; cryo 0.3).")]
VoltageOption = Annotated[float, typer.Option(help="With --ctf/--exposure: acceleration voltage, kV.")]
CsOption = Annotated[float, typer.Option(help="With --ctf: spherical aberration, mm.")]
AmplitudeContrastOption = Annotated[float, typer.Option(help="With --ctf: amplitude contrast.")]
DefocusHandOption = Annotated[int, typer.Option(
    help="With --ctf: 1 or -1, which side of a tilted image is further underfocus (docs/CONVENTIONS.md).")]
ExposureOption = Annotated[Optional[float], typer.Option(
    help="Radiation damage: total exposure in e/A^2, shared equally by the tilts, taken in a "
        "dose-symmetric order (each tilt's signal fades as Grant & Grigorieff's critical exposure says); writes "
        "the exposure before each tilt as tilt_series_pre_exposure.txt. Default none (cryo: 3 per tilt).")]
FrameHalvesOption = Annotated[bool, typer.Option(
    "--frame-halves", help="Also write two half series with independent noise, as odd and even frame "
        "sums would be (tilt_series_odd.mrc, tilt_series_even.mrc; each normalised to the full exposure, "
        "tilt_series.mrc is their mean): for reconstruct --half-series. Gaussian noise only.")]
FieldOfViewOption = Annotated[Optional[int], typer.Option(
    "--field-of-view", help="With --profile cryo: the detector's width and height, pixels (default 160).")]
ProteinsOption = Annotated[Optional[Path], typer.Option(
    help="With --profile cryo and no VOLUME: a folder of protein density maps (*.mrc) to fill the "
        "generated specimen with (default: Gaussian blobs).")]
AcquisitionOption = Annotated[Optional[Path], typer.Option(
    help="With --profile cryo: a YAML file of acquisition settings (any field of "
        "icetide.simulate.cryo.CryoAcquisition, e.g. z_offset_A, n_beads, tilt_axis_deg, drift_max_px, "
        "specimen_thickness_A); settings that have an option here come from the option.")]


@one_line_errors
def simulate(
    out: OutOption,
    volume: VolumeArg = None,
    profile: ProfileOption = "paper",
    snr_db: SnrDbOption = None,
    dose: DoseOption = None,
    tilt_min: TiltMinOption = -60.0,
    tilt_max: TiltMaxOption = 60.0,
    tilt_step: TiltStepOption = 2.0,
    bin_factor: BinFactorOption = 1,
    seed: SeedOption = 0,
    pixel_size: PixelSizeOption = None,
    ctf: CtfOption = False,
    defocus: DefocusOption = None,
    defocus_spread: DefocusSpreadOption = None,
    voltage: VoltageOption = 300.0,
    cs: CsOption = 2.7,
    amplitude_contrast: AmplitudeContrastOption = 0.07,
    defocus_hand: DefocusHandOption = 1,
    exposure: ExposureOption = None,
    frame_halves: FrameHalvesOption = False,
    field_of_view: FieldOfViewOption = None,
    proteins: ProteinsOption = None,
    acquisition: AcquisitionOption = None,
    force: ForceOption = False,
) -> None:
    """Simulate a deformed, noisy tilt series of VOLUME with known truth.

    The (optionally binned) volume is projected by ray integration at randomly
    deformed detector coordinates (shift, in-plane rotation, local warp), then
    i.i.d. Gaussian noise is added, or Poisson counts drawn with --dose
    (docs/CONVENTIONS.md "Simulation protocol").

    Writes in OUT:
    tilt_series.mrc (noisy, deformed; pixel size = bin x voxel size);
    tilt_series.tlt (angles, degrees);
    truth/volume.mrc (the projected volume); truth/deformations.json;
    truth/clean_deformed.mrc; truth/clean_undeformed.mrc;
    truth/noisy_undeformed.mrc (an independent noise draw, same sigma);
    simulation.json (settings, seed, noise sigma, SNRs, timings);
    with --ctf tilt_series.defocus, with --exposure tilt_series_pre_exposure.txt,
    with --frame-halves tilt_series_odd.mrc and tilt_series_even.mrc.

    With --profile cryo: tilt_series.mrc in counts, tilt_series.mrc.mdoc,
    tilt_series.tlt, tilt_series.defocus (estimated, with its error);
    truth/volume.mrc (the specimen without beads over the field of view),
    truth/deformations.json, truth/counts_undeformed.mrc; simulation.json
    (settings, bead positions, the specimen's height, true defocus, levels).
    """
    from ..ctf import Microscope
    from ..io import write_json
    from ..simulate import PROFILES, Optics, bin_volume, simulate_tilt_series

    started = time.perf_counter()
    if profile == "cryo":
        if bin_factor != 1 or frame_halves:
            raise IcetideError("--bin and --frame-halves do not apply to --profile cryo")
        return _cryo(volume, out, snr_db, dose, tilt_min, tilt_max, tilt_step, seed, pixel_size, defocus,
                     defocus_spread, Microscope(voltage, cs, amplitude_contrast), defocus_hand, exposure,
                     field_of_view, proteins, acquisition, force)
    if profile not in PROFILES:
        raise IcetideError(f"--profile must be one of {', '.join(PROFILES)} or cryo, got {profile!r}")
    if volume is None:
        raise IcetideError("give the ground-truth VOLUME (only --profile cryo generates one)")
    snr_db = 10.0 if snr_db is None else snr_db
    defocus = 3.0 if defocus is None else defocus
    defocus_spread = 0.2 if defocus_spread is None else defocus_spread
    exposure = 0.0 if exposure is None else exposure
    _check_plain_options(snr_db, dose, bin_factor, pixel_size, ctf, frame_halves,
                         {"--field-of-view": field_of_view, "--proteins": proteins, "--acquisition": acquisition})
    angles = tilt_range(tilt_min, tilt_max, tilt_step)
    check_output_dir(out, force)
    data, input_shape, header_A = _load_volume(volume, bin_factor)
    voxel_A, voxel_source = _voxel_size(pixel_size, header_A)
    optics = None
    if ctf or exposure != 0:
        optics = Optics(voxel_A * bin_factor, ctf, defocus, defocus_spread, None,
                        Microscope(voltage, cs, amplitude_contrast), defocus_hand, exposure)
    timings = {"read": time.perf_counter() - started}

    start = time.perf_counter()
    truth = bin_volume(data, bin_factor) if bin_factor > 1 else data
    timings["bin"] = time.perf_counter() - start
    pixel_A = voxel_A * bin_factor
    n = len(angles)
    console.print(
        f"simulating {n} tilts ({angles[0]:g} to {angles[-1]:g} deg) of a {truth.shape} volume, "
        f"profile {profile}, " + (f"SNR {snr_db:g} dB" if dose is None else f"Poisson noise, {dose:g} counts/px")
        + (f", CTF at {defocus:g} +- {defocus_spread:g} um" if ctf else "")
        + (f", {exposure:g} e/A^2 of radiation damage" if exposure else "") + f", seed {seed}"
    )
    with output_dir(out, force) as folder:
        with _projection_progress(n) as on_tilt:
            sim = simulate_tilt_series(truth, angles, profile, snr_db, seed, on_tilt=on_tilt, dose_per_px=dose,
                                       optics=optics, frame_halves=frame_halves)
        timings.update(sim.timings_s)

        start = time.perf_counter()
        _write_series(folder, sim, truth, angles, pixel_A)
        timings["write"] = time.perf_counter() - start
        timings["total"] = time.perf_counter() - started
        write_json(folder / "simulation.json", {
            "command": "simulate",
            "icetide_version": __version__,
            "input": str(volume),
            "input_shape_zyx": list(input_shape),
            "bin": bin_factor,
            "volume_shape_zyx": list(truth.shape),
            "detector_shape": list(sim.clean.shape[1:]),
            "input_voxel_size_A": voxel_A,
            "pixel_size_A": pixel_A,
            "pixel_size_source": voxel_source,
            "profile": profile,
            "profile_settings": asdict(PROFILES[profile]),
            "tilt_axis_offset_deg": sim.deformations.extra.get("tilt_axis_offset_deg", 0.0),
            "tilt_min_deg": tilt_min,
            "tilt_max_deg": tilt_max,
            "tilt_step_deg": tilt_step,
            "n_tilts": n,
            "tilt_angles_deg": angles,
            "seed": seed,
            "snr_db": sim.snr_db,
            "snr_definition": "10 log10(sum(y^2) / sum(noise^2)) over the clean deformed series y",
            "snr_db_measured": sim.snr_db_measured,
            "snr_zero_mean_db": sim.snr_zero_mean_db,
            "noise_sigma": sim.sigma,
            "noise": "gaussian" if dose is None else f"poisson, mean {dose:g} counts per pixel (series in counts)",
            "frame_halves": frame_halves,
            "samples_per_voxel": sim.samples_per_voxel,
            "optics": None if optics is None else {
                **asdict(optics),
                "defocus_A": sim.defocus_A,
                "pre_exposure_e_per_A2": sim.pre_exposure_e_per_A2,
                "ctf_convention": "sin(chi + asin(amplitude_contrast)), density bright; defocus positive = "
                "underfocus, on the tilt axis (docs/CONVENTIONS.md)",
            },
            "projection": "line integrals of the trilinear interpolant (zero outside the box) along the rays of "
            "the deformed detector coordinates, midpoint rule inside the slab",
            "timings_s": timings,
        })
    console.print(
        f"done: {out}/tilt_series.mrc {tuple(sim.noisy.shape)} at {pixel_A:g} A/px, noise sigma {sim.sigma:.4g} "
        f"(SNR {sim.snr_db_measured:.2f} dB, zero-mean {sim.snr_zero_mean_db:.2f} dB); "
        f"projection {timings['project_deformed'] + timings['project_undeformed']:.1f} s, "
        f"total {timings['total']:.1f} s"
    )


def _check_plain_options(snr_db: float, dose: Optional[float], bin_factor: int, pixel_size: Optional[float],
                         ctf: bool, frame_halves: bool, cryo_only: dict) -> None:
    """The options of the non-cryo profiles checked; ``cryo_only``: option -> value of those that apply to
    ``--profile cryo`` only."""
    for name, given in cryo_only.items():
        if given is not None:
            raise IcetideError(f"{name} applies to --profile cryo only")
    if not math.isfinite(snr_db):
        raise IcetideError(f"--snr-db must be a finite number, got {snr_db}")
    if dose is not None and not (math.isfinite(dose) and dose > 0):
        raise IcetideError(f"--dose must be a positive number of counts per pixel, got {dose:g}")
    if bin_factor < 1:
        raise IcetideError(f"--bin must be a positive integer, got {bin_factor}")
    if pixel_size is not None and not (math.isfinite(pixel_size) and pixel_size > 0):
        raise IcetideError(f"--pixel-size must be positive, got {pixel_size:g}")
    if dose is not None and ctf:
        raise IcetideError("--dose (counting noise) cannot be combined with --ctf: CTF images are contrast, not counts")
    if dose is not None and frame_halves:
        raise IcetideError("--frame-halves simulates Gaussian noise: it cannot be combined with --dose")


@contextlib.contextmanager
def _projection_progress(n_tilts: int) -> Iterator[Callable[[str, int], None]]:
    """A progress bar over the two projections of ``n_tilts`` tilts (deformed, then undeformed); yields the
    ``on_tilt(stage, i)`` callback that advances it."""
    with Progress(
        TextColumn("[bold]projecting {task.fields[stage]}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("tilts"), TimeElapsedColumn(), console=console,
    ) as progress:
        task = progress.add_task("project", total=2 * n_tilts, stage="")

        def on_tilt(stage: str, i: int) -> None:
            progress.update(task, completed=i + 1 + (n_tilts if stage == "undeformed" else 0), stage=stage)

        yield on_tilt


def _write_series(folder: Path, sim, truth: np.ndarray, angles: np.ndarray, pixel_A: float) -> None:
    """The simulated series ``sim`` (:class:`icetide.simulate.acquire.SimulatedTiltSeries`) and its truth as
    ``simulate`` writes them into ``folder`` (pixel size ``pixel_A``)."""
    from ..io import write_deformations, write_imod_defocus, write_mrc, write_pre_exposure, write_tlt

    write_mrc(folder / "tilt_series.mrc", sim.noisy, pixel_A, stack=True)
    write_tlt(folder / "tilt_series.tlt", angles)
    if sim.noisy_halves is not None:
        write_mrc(folder / "tilt_series_odd.mrc", sim.noisy_halves[0], pixel_A, stack=True)
        write_mrc(folder / "tilt_series_even.mrc", sim.noisy_halves[1], pixel_A, stack=True)
    if sim.defocus_A is not None:
        write_imod_defocus(folder / "tilt_series.defocus", angles, sim.defocus_A)
    if sim.pre_exposure_e_per_A2 is not None:
        write_pre_exposure(folder / "tilt_series_pre_exposure.txt", sim.pre_exposure_e_per_A2)
    (folder / "truth").mkdir()
    write_mrc(folder / "truth" / "volume.mrc", truth, pixel_A)
    write_deformations(folder / "truth" / "deformations.json", sim.deformations)
    write_mrc(folder / "truth" / "clean_deformed.mrc", sim.clean, pixel_A, stack=True)
    write_mrc(folder / "truth" / "clean_undeformed.mrc", sim.clean_undeformed, pixel_A, stack=True)
    write_mrc(folder / "truth" / "noisy_undeformed.mrc", sim.noisy_undeformed, pixel_A, stack=True)


def _cryo(volume, out, snr_db, dose, tilt_min, tilt_max, tilt_step, seed, pixel_size, defocus, defocus_spread,
          microscope, defocus_hand, exposure, field_of_view, proteins, acquisition, force) -> None:
    """``--profile cryo``: the options mapped onto :class:`icetide.simulate.cryo.CryoAcquisition`."""
    from .simulate_cryo import cryo_settings, simulate_cryo_command

    if snr_db is not None and dose is not None:
        raise IcetideError("give at most one of --snr-db and --dose: each sets the counts level")
    angles = tilt_range(tilt_min, tilt_max, tilt_step)
    settings = cryo_settings(
        acquisition, field_of_view=None if field_of_view is None else (field_of_view, field_of_view),
        pixel_size_A=pixel_size, tilt_min_deg=tilt_min, tilt_max_deg=tilt_max, tilt_step_deg=tilt_step,
        snr_db=snr_db, level_counts=dose, defocus_um=defocus, defocus_spread_um=defocus_spread,
        defocus_hand=defocus_hand, microscope=microscope,
        dose_per_tilt_e_per_A2=None if exposure is None else exposure / len(angles),
    )
    simulate_cryo_command(volume, out, settings, seed, proteins, force)
