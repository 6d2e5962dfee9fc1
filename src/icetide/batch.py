"""Many tilt series: find them, reconstruct each on a Dask cluster, and summarise (``icetide batch``).

Each series is one Dask task running :func:`icetide.reconstruct.reconstruct` into ``OUT/<name>/``. A task writes
into ``OUT/.<name>.partial/`` and renames it when done, so a finished folder is complete and a re-run skips it;
a failure is retried by Dask (``retries``) and, if it persists, reported without stopping the other series.
Dask's ``distributed`` is an extra (``pip install 'icetide[batch]'``), so it is imported only where it is used.

A series is named by its stack or by its SerialEM ``.mdoc`` (the stack found beside it). Side files lying beside
the stack with its stem are used as ``icetide reconstruct`` would use them given as options: IMOD ``.xf`` or
AreTomo ``.aln`` (the starting alignment), CTFFIND ``_CTF.txt`` or IMOD ``.defocus`` (the per-view defocus).
In an AreTomo3 output folder each ``X.aln`` names a series (``X.mrc``, angles from ``X_TLT.txt``; the views at its
dark frames' tilts are excluded); its ``X_ODD``/``X_EVN``/``X_Vol`` stacks are not series of their own.
A RELION-5 tilt-series STAR names one series per ``rlnTomoName``, its micrographs one MRC per tilt
(:mod:`icetide.io.relion_project`); its optics and defocus hand set ``config.ctf`` for that series.
Every finished series contributes one row of quality metrics (:func:`series_metrics`) read from its outputs.
"""

from __future__ import annotations

import json
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PureWindowsPath
from typing import Callable, Iterable

import numpy as np

from .config import ReconstructConfig
from .errors import IcetideError
from .output_files import OutputNames

__all__ = ["QC_COLUMNS", "BatchItem", "find_items", "load_item", "run_batch", "run_item", "series_metrics"]

STACK_SUFFIXES = (".mrc", ".st", ".mrcs", ".ali")
# Where ``X.mdoc`` has no stack suffix in its name, its stack is one of these beside it (SerialEM, IMOD).
MDOC_STACK_SUFFIXES = (".mrc", ".st")
# Side files beside a stack, ``<stem><ending>``, in order of preference per kind.
SIDE_FILES = {"xf": (".xf",), "aln": (".aln",), "defocus": ("_CTF.txt", "_ctf.txt", ".defocus")}
# The per-series quality metrics of the summary (:func:`series_metrics`), in the order of batch_metrics.csv.
QC_COLUMNS = ("n_views", "bin", "pixel_size_A", "val_loss", "even_odd_fsc", "half_map_fsc143_A", "beads",
              "bead_residual_px", "tilt_axis_deg", "shift_range_px", "epochs", "fit_seconds")


@dataclass(frozen=True)
class BatchItem:
    """One tilt series: its stack, where its angles come from and, when known, the truth to score against.

    ``angles``: an IMOD ``.tlt``/``.rawtlt`` file; ``mdoc``: a SerialEM ``.mdoc`` (used when there is no
    ``angles``); ``angles_deg``: angles given directly (from a RELION-5 STAR); ``truth``: a ground-truth volume
    (``icetide simulate`` writes ``truth/volume.mrc`` beside the series); ``xf``/``aln``: a starting alignment
    (IMOD, AreTomo); ``defocus``: per-view defocus (CTFFIND, IMOD); ``problem``: why the series cannot run,
    found while listing it (e.g. an ``.mdoc`` without its stack), reported as its failure; ``relion``: the
    RELION-5 tilt-series STAR listing the series (``name`` its ``rlnTomoName``, ``stack`` its per-series STAR).
    """

    name: str
    stack: str
    angles: str | None = None
    mdoc: str | None = None
    angles_deg: tuple[float, ...] | None = None
    truth: str | None = None
    xf: str | None = None
    aln: str | None = None
    defocus: str | None = None
    problem: str | None = None
    relion: str | None = None

    def side_files(self) -> str:
        """The side files used, by name (``""`` when none)."""
        return ", ".join(Path(p).name for p in (self.xf, self.aln, self.defocus) if p)


def _stem(path: Path) -> str:
    name = path.name.removesuffix(".gz")
    for suffix in STACK_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def _item_for_stack(stack: Path) -> BatchItem:
    """The angles and truth found beside ``stack``: ``<stem>.tlt``/``.rawtlt``/``_TLT.txt`` (AreTomo3),
    ``<file>.mdoc``/``<stem>.mdoc``."""
    stem = _stem(stack)
    angles = next((p for p in (stack.with_name(stem + e) for e in (".tlt", ".rawtlt", "_TLT.txt")) if p.is_file()),
                  None)
    mdoc = next((p for p in (stack.with_name(stack.name + ".mdoc"), stack.with_name(stem + ".mdoc")) if p.is_file()),
                None)
    truth = stack.parent / "truth" / "volume.mrc"
    return BatchItem(stem, str(stack), str(angles) if angles else None, str(mdoc) if mdoc else None,
                     truth=str(truth) if truth.is_file() else None)


def _mdoc_stacks(mdoc: Path) -> list[Path]:
    """Where the stack of ``mdoc`` may lie: ``X.mrc`` for ``X.mrc.mdoc``, ``X.mrc``/``X.st`` for ``X.mdoc``."""
    base = mdoc.with_name(mdoc.name.removesuffix(".mdoc"))
    if base.name.endswith(STACK_SUFFIXES):
        return [base]
    return [base.with_name(base.name + suffix) for suffix in MDOC_STACK_SUFFIXES]


def _is_series_mdoc(path: Path) -> bool:
    """An ``.mdoc`` that may describe a tilt-series stack, not one of SerialEM's per-movie frame mdocs
    (``X.tif.mdoc``, ``X.eer.mdoc``), which a folder of raw data also holds."""
    if not path.name.endswith(".mdoc"):
        return False
    base = path.name.removesuffix(".mdoc")
    return base.endswith(STACK_SUFFIXES) or base.rpartition(".")[2].lower() not in ("tif", "tiff", "eer")


def _item_for_mdoc(mdoc: Path) -> BatchItem:
    """One series from its SerialEM ``.mdoc``: its stack beside it (named like the mdoc, else as the mdoc's
    ``ImageFile``); angles, pixel size, tilt axis and doses from the mdoc. Without a stack: an item with its
    ``problem``."""
    from .io import read_mdoc

    candidates = _mdoc_stacks(mdoc)
    stack = next((p for p in candidates if p.is_file()), None)
    if stack is None:
        try:
            image_file = read_mdoc(mdoc)["header"].get("ImageFile")
        except IcetideError as exc:
            return BatchItem(_stem(candidates[0]), str(candidates[0]), mdoc=str(mdoc), problem=str(exc))
        # SerialEM writes the path where it saved the stack, often a Windows one: only its name counts here.
        named = mdoc.with_name(PureWindowsPath(image_file).name) if image_file else None
        if named is None or not named.is_file():
            looked = ", ".join(dict.fromkeys(p.name for p in candidates + ([named] if named else [])))
            return BatchItem(_stem(candidates[0]), str(candidates[0]), mdoc=str(mdoc),
                             problem=f"{mdoc}: no stack beside it (looked for {looked})")
        stack = named
    return replace(_item_for_stack(stack), angles=None, mdoc=str(mdoc))


def _side_files(stack: Path) -> dict[str, str | None]:
    """The side files lying beside ``stack`` with its stem (:data:`SIDE_FILES`); an ``.xf`` before an ``.aln``
    (one starting alignment)."""
    stem = _stem(stack)
    found = {kind: next((str(p) for p in (stack.with_name(stem + e) for e in endings) if p.is_file()), None)
             for kind, endings in SIDE_FILES.items()}
    if found["xf"]:
        found["aln"] = None
    return found


def _items_from_tomograms_star(path: Path) -> list[BatchItem]:
    """RELION-5: every row of ``tomograms.star``; the stack from its tilt-series STAR's ``rlnMicrographName``
    (``k@stack``) and the angles from ``rlnTomoNominalStageTiltAngle``, in the STAR's row order."""
    import starfile

    from .io import read_relion_tomograms_star

    items = []
    for entry in read_relion_tomograms_star(path):
        star = Path(entry.tilt_series_star_file)
        star = star if star.is_absolute() else path.parent / star
        if not star.is_file():
            raise IcetideError(f"{path}: tilt series {entry.name}: {star} not found")
        data = starfile.read(star, always_dict=True)
        table = next((b for b in data.values() if hasattr(b, "columns") and "rlnMicrographName" in b.columns), None)
        if table is None or "rlnTomoNominalStageTiltAngle" not in table.columns:
            raise IcetideError(f"{star}: needs rlnMicrographName and rlnTomoNominalStageTiltAngle to find the images")
        stacks = {str(name).partition("@")[2] for name in table["rlnMicrographName"]}
        if len(stacks) != 1 or "" in stacks:
            raise IcetideError(f"{star}: images must be one stack named k@stack")
        stack = Path(stacks.pop())
        stack = stack if stack.is_absolute() else star.parent / stack
        order = np.argsort([int(str(n).partition("@")[0]) for n in table["rlnMicrographName"]])
        angles = tuple(float(a) for a in np.asarray(table["rlnTomoNominalStageTiltAngle"], dtype=float)[order])
        items.append(BatchItem(entry.name, str(stack), angles_deg=angles))
    return items


def _items_from_star(path: Path) -> list[BatchItem]:
    """Every series of a RELION-5 global STAR: icetide's own ``tomograms.star`` (images ``k@stack``,
    :func:`_items_from_tomograms_star`) or a RELION-5 project's tilt-series STAR (one micrograph per tilt; the
    per-series STAR is read when the series runs, so that a broken one fails alone)."""
    from .io.relion_project import names_stack_slices, read_relion_project

    entries = read_relion_project(path)
    if all(names_stack_slices(e.star) for e in entries):
        return _items_from_tomograms_star(path)
    return [BatchItem(e.name, str(e.star), relion=str(path)) for e in entries]


def _listed(path: Path) -> list[Path]:
    """The stacks and ``.mdoc`` files a text file lists, one per line, relative to the file; ``#`` comments."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [p if p.is_absolute() else path.parent / p for p in map(Path, lines) if str(p) != "." and str(p)[0] != "#"]


def _in_folder(folder: Path) -> list[Path]:
    """A folder's stacks, then its tilt-series ``.mdoc`` files (a stack found both ways is the stack's). A stack
    ``X_<anything>`` beside an ``X.aln`` and without an ``.aln`` of its own is AreTomo3's (ODD, EVN, Vol), not a
    series."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    alns = {p.stem for p in files if p.suffix == ".aln"}
    stacks = [p for p in files if p.suffix in STACK_SUFFIXES
              and (_stem(p) in alns or not any(_stem(p).startswith(x + "_") for x in alns))]
    return stacks + [p for p in files if _is_series_mdoc(p)]


def _named_paths(text: str) -> list[Path]:
    """The stacks and ``.mdoc`` files that one input names (see :func:`find_items`)."""
    path = Path(text)
    if path.suffix == ".txt" and path.is_file():
        return _listed(path)
    if path.is_dir():
        return _in_folder(path)
    if path.is_file():
        return [path]
    matches = sorted(Path().glob(text)) if not path.is_absolute() else sorted(Path("/").glob(text[1:]))
    if not matches:
        raise IcetideError(f"{text}: no such file, folder or matching path")
    return [p for p in matches if p.is_file()]


def find_items(inputs: Iterable[str], side_files: bool = True) -> list[BatchItem]:
    """The tilt series named by ``inputs``: stack files, SerialEM ``.mdoc`` files (the stack beside each),
    folders (their stacks and mdocs), glob patterns, text files with one stack or mdoc path per line (relative
    to the file), or RELION-5 STAR files (:func:`_items_from_star`). ``side_files``: pick up each stack's
    :data:`SIDE_FILES`.

    Names are the stacks' stems, prefixed by their folder's name where stems repeat; a stack named twice is one
    series (the first naming counts). A series without angles or an mdoc without its stack is still listed (its
    task fails with a clear message), so that one bad series never hides the others.
    """
    paths: list[Path] = []
    items: list[BatchItem] = []
    for text in inputs:
        path = Path(text)
        if path.name.endswith(".star"):
            if not path.is_file():
                raise IcetideError(f"{path}: no such file")
            items += _items_from_star(path)
        else:
            paths += _named_paths(text)
    for path in dict.fromkeys(paths):
        if not path.is_file():
            raise IcetideError(f"{path}: no such file")
        items.append(_item_for_mdoc(path) if path.name.endswith(".mdoc") else _item_for_stack(path))
    unique: dict[str, BatchItem] = {}
    for item in items:
        unique.setdefault(item.mdoc if item.problem else str(Path(item.stack).resolve()), item)
    items = list(unique.values())
    if side_files:
        items = [i if i.problem or i.relion else replace(i, **_side_files(Path(i.stack))) for i in items]
    names = [i.name for i in items]
    items = [
        BatchItem(**{**asdict(i), "name": f"{Path(i.stack).parent.name}_{i.name}"}) if names.count(i.name) > 1 else i
        for i in items
    ]
    if len({i.name for i in items}) != len(items):
        raise IcetideError("two tilt series would share an output folder: " + ", ".join(sorted(names)))
    if not items:
        raise IcetideError("no tilt series found in the inputs")
    return items


def _device_for_worker(device: str) -> str:
    """``auto`` on a multi-GPU worker: the GPU of this Dask worker (its number modulo the GPU count)."""
    import torch

    if device != "auto" or not torch.cuda.is_available():
        return device
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return device
    return f"cuda:{int(name) % torch.cuda.device_count()}" if str(name).isdigit() else device


def _load_relion_item(item: BatchItem, config: ReconstructConfig, invert: bool, exclude: str | None):
    """:func:`load_item` of a series of a RELION-5 tilt-series STAR; sets ``config.ctf``'s optics and defocus hand
    from the STAR. Its even/odd sums are the two half series when ``config.fit.half_maps`` is series."""
    import warnings

    from .inputs import load_inputs, relion_inputs
    from .io.relion_project import relion_series

    given = dict(angles=None, mdoc=None, defocus=None, pre_exposure=None, half_series=None,
                 half_maps=config.fit.half_maps)
    got, _ = relion_inputs(relion_series(item.relion, item.name), given)
    for key, value in got["ctf"].items():
        setattr(config.ctf, key, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_inputs(got["tilt_series"], got["angles"], None, config.pixel_size_A or got["pixel_size"],
                           config.tilt_axis_angle_deg or got["tilt_axis_angle"], exclude, invert,
                           image_names=got["image_names"], defocus=got["defocus"],
                           pre_exposure=got["pre_exposure"], half_series=got["half_series"])


def load_item(item: BatchItem, config: ReconstructConfig, folder: Path, invert: bool, exclude: str | None):
    """The series of ``item`` as ``icetide reconstruct`` loads it, its starting alignment (or ``None``) and the
    views of its stack it holds."""
    import warnings

    from .inputs import load_inputs
    from .io import read_aln, read_tlt, write_tlt
    from .io.aretomo import exclude_dark_views

    if item.problem is not None:
        raise IcetideError(item.problem)
    if item.relion is not None:
        return _load_relion_item(item, config, invert, exclude)
    if item.angles_deg is not None:
        write_tlt(folder / "input.tlt", item.angles_deg)
        angles = folder / "input.tlt"
    else:
        angles = Path(item.angles) if item.angles else None
    if angles is None and item.mdoc is None:
        raise IcetideError(f"{item.stack}: no .tlt, .rawtlt or .mdoc beside it")
    # The doses of the mdoc only matter to exposure weighting; an mdoc without them must not fail the others.
    pre_exposure = Path(item.mdoc) if item.mdoc and config.ctf.exposure_weighting else None
    if item.aln and angles is not None:  # AreTomo3's stack keeps the dark views its .aln leaves out
        exclude = exclude_dark_views(exclude, read_aln(item.aln), read_tlt(angles))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_inputs(
            Path(item.stack), angles, None if angles else Path(item.mdoc), config.pixel_size_A,
            config.tilt_axis_angle_deg or None, exclude, invert, xf=Path(item.xf) if item.xf else None,
            aln=Path(item.aln) if item.aln else None, defocus=Path(item.defocus) if item.defocus else None,
            pre_exposure=pre_exposure,
        )


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


def series_metrics(folder: Path) -> dict:
    """The quality metrics (:data:`QC_COLUMNS`) of a finished series, from its ``report.json`` and
    ``deformations.json``: views fitted, binning, pixel size (A, of the fit), best held-out loss, the even/odd-tilt
    FSC score of the alignment kept by the start check, the half-map resolution at FSC 0.143 (A; ``None`` without
    half maps, without a pixel size, or beyond Nyquist), the gold beads followed and their mean residual (pixels
    of the fit; ``None`` without beads), the tilt axis on the images (degrees from Y), the range
    of the per-view shifts (the larger of x and y, pixels of the input stack), epochs and fitting seconds."""
    from .ctf import tilt_axis_on_images_deg

    report = json.loads((folder / "report.json").read_text())
    loss = report.get("best_validation_loss")
    check = report.get("start_check")
    half = report.get("half_maps", {}).get("resolution", {}).get("0.143", {})
    beads = report.get("bead_residual", {})
    row = {
        "n_views": report.get("input", {}).get("n_tilts"),
        "bin": report.get("bin"),
        "pixel_size_A": _rounded(report.get("input", {}).get("pixel_size_A"), 3),
        "val_loss": None if loss is None else float(f"{loss:.6g}"),
        "even_odd_fsc": _rounded(check[f"{check['kept']}_score"], 4) if check else None,
        "half_map_fsc143_A": _rounded(half.get("angstrom"), 1),
        "beads": beads.get("beads"),
        "bead_residual_px": _rounded(beads.get("residual_px"), 3),
        "tilt_axis_deg": None,
        "shift_range_px": None,
        "epochs": report.get("epochs"),
        "fit_seconds": _rounded(report.get("fit_seconds"), 1),
    }
    if (folder / "deformations.json").is_file():
        d = json.loads((folder / "deformations.json").read_text())
        shifts = np.asarray(d["shifts_px"], dtype=np.float64).reshape(-1, 2)
        row["tilt_axis_deg"] = round(tilt_axis_on_images_deg(0.0, d["angles_deg"]), 2) + 0.0  # no -0.0
        row["shift_range_px"] = round(float(np.ptp(shifts, axis=0).max()), 2)
    return row


def _row(name: str, status: str, seconds: float | None = None, cc: float | None = None,
         metrics: dict | None = None) -> dict:
    """A summary row; the quality metrics ``None`` when not given (a failed series)."""
    return {"name": name, "status": status, "seconds": seconds, "cc": cc,
            **(metrics or dict.fromkeys(QC_COLUMNS))}


def run_item(item: BatchItem, out_root: str, config_json: dict, invert: bool = False,
             exclude: str | None = None) -> dict:
    """Reconstruct one series into ``out_root/<name>`` (skipped when already finished); returns its summary row
    (see :func:`run_batch`). ``invert``, ``exclude``: as ``icetide reconstruct``'s, for every series.

    Raises ``IcetideError`` (or any other error) when it fails, after removing its partial folder.
    """
    from .io import read_volume, write_json
    from .metrics import evaluate_reconstruction
    from .reconstruct import reconstruct

    out = Path(out_root) / item.name
    if (out / "report.json").is_file():
        return _row(item.name, "skipped (already done)", 0.0, metrics=series_metrics(out))
    partial = Path(out_root) / f".{item.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    t0 = time.monotonic()
    try:
        config = ReconstructConfig.model_validate(config_json)
        config.fit.device = _device_for_worker(config.fit.device)
        series, init, stack = load_item(item, config, partial, invert, exclude)
        report = reconstruct(series, config, partial, init=init, source_path=Path(item.stack), input_stack=stack,
                             names=OutputNames(item.name))
        # What the series was made of, beside what reconstruct reports: the options are not in config.yaml.
        report["batch"] = {"stack": item.stack, "angles": item.angles, "mdoc": item.mdoc, "xf": item.xf,
                           "aln": item.aln, "defocus": item.defocus, "relion": item.relion, "invert": invert,
                           "exclude": exclude}
        write_json(partial / "report.json", report)
        cc = None
        if item.truth is not None:
            from .io import read_mrc

            truth, _ = read_volume(item.truth)
            tomogram, _ = read_mrc(partial / report["outputs"]["tomogram"])
            if truth.shape == tomogram.shape:
                cc = evaluate_reconstruction(tomogram, truth)["cc"]
        metrics = series_metrics(partial)
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return _row(item.name, "done", time.monotonic() - t0, cc, metrics)


def _failure_text(exc: BaseException) -> str:
    if isinstance(exc, IcetideError):
        return str(exc)
    last = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return last.splitlines()[0]


def run_batch(
    items: list[BatchItem],
    out_root: Path,
    config: ReconstructConfig,
    client,
    retries: int = 1,
    on_result: Callable[[dict], None] | None = None,
    invert: bool = False,
    exclude: str | None = None,
) -> list[dict]:
    """Submit every item to the Dask ``client`` and collect one summary row per item (in ``items`` order).

    Rows: ``name``, ``status`` (``done``, ``skipped (already done)`` or ``failed: <reason>``), ``seconds``,
    ``cc`` (with the truth, when found), the quality metrics :data:`QC_COLUMNS` (``None`` where failed),
    ``stack`` and ``side_files``. ``on_result`` is called as each row arrives. ``invert``, ``exclude``: as
    ``icetide reconstruct``'s, for every series.
    """
    from distributed import as_completed

    out_root.mkdir(parents=True, exist_ok=True)
    config_json = config.model_dump(mode="json")
    futures = {
        client.submit(run_item, item, str(out_root), config_json, invert, exclude,
                      key=f"icetide-{item.name}-{time.time_ns()}", retries=retries, pure=False): item
        for item in items
    }
    rows: dict[str, dict] = {}
    for future in as_completed(futures):
        item = futures[future]
        try:
            row = future.result()
        except Exception as exc:  # one failed series never stops the others
            row = _row(item.name, f"failed: {_failure_text(exc)}")
        row.update(stack=item.stack, side_files=item.side_files())
        rows[item.name] = row
        if on_result is not None:
            on_result(row)
    return [rows[item.name] for item in items]
