"""What every command shares: one-line errors, output folders, progress and warnings (printed and logged)."""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from ..errors import IcetideError
from ..runlog import LOG_NAME

if TYPE_CHECKING:
    from ..io.relion_project import RelionTiltSeries

# IMOD writes tilt angles with two decimals.
ANGLE_TOLERANCE_DEG = 0.01

console = Console(stderr=True)
# What a command prints also goes, plain, to the run log open at the time (icetide.runlog).
log = logging.getLogger("icetide.cli")
F = TypeVar("F", bound=Callable)


def say(text: str) -> None:
    """Print ``text`` (rich markup) on one line and add it, plain, to the open run log."""
    console.print(text, highlight=False, soft_wrap=True)
    log.info(Text.from_markup(text).plain)


def warn(message: str) -> None:
    """Print ``warning: message`` on one line and add it to the open run log."""
    console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)
    log.warning(message)


@contextlib.contextmanager
def held_warnings(into: list[str]) -> Iterator[None]:
    """Print the Python warnings raised inside as ``warning:`` lines and keep their messages in ``into``: inputs
    are read before the output folder, and its run log, exist (log them once it is open)."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for warning in caught:
            console.print(f"[yellow]warning:[/] {escape(str(warning.message))}", highlight=False, soft_wrap=True)
            into.append(str(warning.message))


def fail(message: str) -> None:
    """Print ``error: message`` on one line to stderr and exit with status 2."""
    # Escaped: messages quote brackets ("pip install 'icetide[batch]'", "[section]") that rich would take as markup.
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def one_line_errors(func: F) -> F:
    """Turn expected failures (bad input, missing files, out of memory) into one line and exit 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except IcetideError as exc:
            fail(str(exc))
        except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            fail(f"{exc.filename}: {exc.strerror}")
        except MemoryError:
            fail("out of memory; try a smaller size or --max-memory")
        except KeyboardInterrupt:
            console.print("interrupted")
            raise typer.Exit(code=130)

    return wrapper  # type: ignore[return-value]


def check_alignment_options(deformations: Path | None, xf: Path | None, aln: Path | None) -> None:
    """At most one source of an alignment."""
    given = [name for name, value in (("--deformations", deformations), ("--xf", xf), ("--aln", aln)) if value]
    if len(given) > 1:
        raise IcetideError(f"{' and '.join(given)} exclude each other")


def read_alignment(
    tilt_angles_deg, detector_shape: tuple[int, int], deformations: Path | None, xf: Path | None, aln: Path | None,
    keep=None,
):
    """The alignment of the kept views of a stack from deformations.json, an IMOD ``.xf`` or an AreTomo ``.aln``,
    or ``None``.

    ``tilt_angles_deg``: of every view of the stack, in stack order; ``detector_shape``: ``(ny, nx)``; ``keep``:
    the 0-based stack indices of the views kept (default all). A deformations.json or ``.xf`` has one entry per
    view of the stack (as IMOD's files and icetide's ``STEM.xf`` do) or one per kept view (as icetide's
    deformations.json of a run with the same ``--exclude``); deformations.json's tilt angles must match.
    ``.aln`` rows are matched by tilt angle to the kept views.
    """
    import numpy as np

    angles = np.asarray(tilt_angles_deg, dtype=np.float64).reshape(-1)
    keep = np.arange(len(angles)) if keep is None else np.asarray(keep, dtype=int)

    def kept_rows(n_rows: int, source: Path, noun: str):
        """The rows of a file of ``n_rows`` entries (``noun``) that describe the kept views."""
        if n_rows == len(angles):
            return keep
        if n_rows == len(keep):
            return slice(None)
        also = f" or the {len(keep)} it keeps" if len(keep) < len(angles) else ""
        raise IcetideError(f"{source}: {n_rows} {noun} for a series of {len(angles)} views{also}")

    if deformations is not None:
        from ..io import read_deformations

        d = read_deformations(deformations, detector_shape)
        d = d.subset(kept_rows(d.n_tilts, deformations, "tilts"))
        worst = float(np.abs(d.tilt_angles_deg - angles[keep]).max())
        if worst > ANGLE_TOLERANCE_DEG:
            raise IcetideError(f"{deformations}: tilt angles differ from the angle file by up to {worst:.3g} degrees")
        return d
    if xf is not None:
        from ..alignment import xf_to_deformations
        from ..io import read_xf

        transforms = read_xf(xf)
        transforms = transforms[kept_rows(len(transforms), xf, "transforms")]
        # Real .xf files often carry a slight magnification or stretch: keep the nearest rotation (warns).
        return xf_to_deformations(transforms, angles[keep], detector_shape, non_rotation="nearest")
    if aln is not None:
        from ..alignment import aln_to_deformations
        from ..io import read_aln

        return aln_to_deformations(read_aln(aln), angles[keep], detector_shape)
    return None


def load_inputs(
    stack, angles, mdoc: Path | None, pixel_size_A: float | None, tilt_axis_angle_deg: float | None,
    exclude: str | None, invert: bool, deformations: Path | None = None, xf: Path | None = None,
    aln: Path | None = None, image_names=None, **series_options,
):
    """The tilt series to fit (:func:`icetide.io.series.load_series`, ``series_options`` passed on), its starting
    alignment (:func:`read_alignment`, or ``None``) and the :class:`icetide.data.InputStack` it came from
    (``image_names``: each view's own file where ``stack`` is one file per view). With a start, the series'
    tilt-axis angle is 0: the starting rotations already hold the axis (one read from the ``.mdoc`` must not
    count twice)."""
    from ..data import InputStack
    from ..io.series import load_series

    series, keep, all_angles = load_series(stack, angles, mdoc, pixel_size_A, tilt_axis_angle_deg, exclude, invert,
                                           **series_options)
    init = read_alignment(all_angles, series.shape, deformations, xf, aln, keep)
    if init is not None:
        series.tilt_axis_angle_deg = 0.0
    names = None if image_names is None else tuple(str(n) for n in image_names)
    return series, init, InputStack(all_angles, keep, invert, names)


def relion_inputs(found: RelionTiltSeries, given: dict) -> tuple[dict, str]:
    """The inputs a RELION-5 tilt series (:class:`icetide.io.relion_project.RelionTiltSeries`) gives where the
    options ``given`` (``angles``, ``mdoc``, ``defocus``, ``pre_exposure``, ``half_series``, ``half_maps``) leave
    them open, plus ``tilt_series`` (one MRC per view, in order of tilt angle), ``image_names`` (each view's
    micrograph, for the written STAR), ``source_path`` (its per-series STAR, named after the series),
    ``pixel_size`` and ``tilt_axis_angle`` (to use where no option gives them) and ``ctf`` (the STAR's optics
    and defocus hand by :class:`icetide.config.CtfSettings` field); and a line saying what the STAR gave.
    Its even/odd frame sums become the two half series unless other half maps or a half series are asked for."""
    entry = found.entry
    out = dict(given, tilt_series=list(found.images), source_path=entry.star,
               image_names=[str(p.resolve()) for p in found.images], pixel_size=entry.pixel_size_A,
               tilt_axis_angle=found.tilt_axis_angle_deg,
               ctf={"voltage_kV": entry.voltage_kV, "spherical_aberration_mm": entry.spherical_aberration_mm,
                    "amplitude_contrast": entry.amplitude_contrast, "defocus_hand": entry.hand})
    used = [f"RELION-5 series {found.name}: {len(found.images)} micrographs in tilt-angle order"]
    if given["angles"] is None and given["mdoc"] is None:
        out["angles"] = found.tilt_angles_deg
    if found.defocus_A is not None and given["defocus"] is None:
        out["defocus"] = found.defocus_A
        used.append("defocus (rlnDefocusU/V)")
    if given["pre_exposure"] is None:
        out["pre_exposure"] = found.pre_exposure_e_per_A2
    if found.odd is not None and given["half_series"] is None and given["half_maps"] in (None, "series"):
        out["tilt_series"], out["half_series"] = list(found.odd), list(found.even)
        used.append("half series rlnMicrographNameOdd/Even")
    pixel = "" if entry.pixel_size_A is None else f"pixel {entry.pixel_size_A:g} A, "
    used.append(f"{pixel}nominal tilt axis {found.tilt_axis_angle_deg:g} deg, hand {entry.hand:+d}")
    return out, ", ".join(used)


def _outputs(path: Path) -> list[Path]:
    """What a folder holds but its run log (which every run into the folder appends to)."""
    return [child for child in path.iterdir() if child.name != LOG_NAME]


def check_output_dir(path: Path, force: bool) -> Path:
    """Refuse an existing file or a folder with outputs at ``path`` unless ``force``; creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise IcetideError(f"{path}: exists and is not a folder")
    if path.exists() and _outputs(path) and not force:
        raise IcetideError(f"{path}: output folder is not empty (use --force to overwrite)")
    return path


@contextlib.contextmanager
def output_dir(path: Path, force: bool) -> Iterator[Path]:
    """Create the output folder for a command (``force``: empty it first); on failure remove what this command
    wrote but its run log (``icetide.log`` says why it failed), and the folder if this command created it and
    either no output had been written yet (bad input found late) or no log is left.

    Validate inputs before entering, so that bad input never leaves a folder behind.
    """
    path = check_output_dir(path, force)
    created = not path.exists()
    if path.exists() and force:
        for child in _outputs(path):
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        written = _outputs(path)
        for child in written:
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        if created and (not written or not any(path.iterdir())):
            shutil.rmtree(path, ignore_errors=True)
        raise
