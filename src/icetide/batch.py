"""Many tilt series: find them, reconstruct each on a Dask cluster, and summarise (``icetide batch``).

Each series is one Dask task running :func:`icetide.reconstruct.reconstruct` into ``OUT/<name>/``. A task writes
into ``OUT/.<name>.partial/`` and renames it when done, so a finished folder is complete and a re-run skips it;
a failure is retried by Dask (``retries``) and, if it persists, reported without stopping the other series.
Dask's ``distributed`` is an extra (``pip install 'icetide[batch]'``), so it is imported only where it is used.
"""

from __future__ import annotations

import shutil
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .config import ReconstructConfig
from .errors import IcetideError

__all__ = ["BatchItem", "find_items", "run_batch", "run_item"]

STACK_SUFFIXES = (".mrc", ".st", ".mrcs", ".ali")


@dataclass(frozen=True)
class BatchItem:
    """One tilt series: its stack, where its angles come from and, when known, the truth to score against.

    ``angles``: an IMOD ``.tlt``/``.rawtlt`` file; ``mdoc``: a SerialEM ``.mdoc`` (used when there is no
    ``angles``); ``angles_deg``: angles given directly (from a RELION-5 STAR); ``truth``: a ground-truth volume
    (``icetide simulate`` writes ``truth/volume.mrc`` beside the series).
    """

    name: str
    stack: str
    angles: str | None = None
    mdoc: str | None = None
    angles_deg: tuple[float, ...] | None = None
    truth: str | None = None


def _stem(path: Path) -> str:
    name = path.name.removesuffix(".gz")
    for suffix in STACK_SUFFIXES:
        name = name.removesuffix(suffix)
    return name


def _item_for_stack(stack: Path) -> BatchItem:
    """The angles and truth found beside ``stack``: ``<stem>.tlt``/``.rawtlt``, ``<file>.mdoc``/``<stem>.mdoc``."""
    stem = _stem(stack)
    angles = next((p for p in (stack.with_name(stem + ".tlt"), stack.with_name(stem + ".rawtlt")) if p.is_file()), None)
    mdoc = next((p for p in (stack.with_name(stack.name + ".mdoc"), stack.with_name(stem + ".mdoc")) if p.is_file()),
                None)
    truth = stack.parent / "truth" / "volume.mrc"
    return BatchItem(stem, str(stack), str(angles) if angles else None, str(mdoc) if mdoc else None,
                     truth=str(truth) if truth.is_file() else None)


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


def find_items(inputs: Iterable[str]) -> list[BatchItem]:
    """The tilt series named by ``inputs``: stack files, folders (their stacks), glob patterns, text files with
    one stack path per line (relative to the file), or RELION-5 ``tomograms.star`` files.

    Names are the stacks' stems, prefixed by their folder's name where stems repeat. A stack without angles is
    still listed (its task fails with a clear message), so that one bad series never hides the others.
    """
    stacks: list[Path] = []
    items: list[BatchItem] = []
    for text in inputs:
        path = Path(text)
        if path.name.endswith(".star"):
            if not path.is_file():
                raise IcetideError(f"{path}: no such file")
            items += _items_from_tomograms_star(path)
        elif path.suffix == ".txt" and path.is_file():
            lines = [line.strip() for line in path.read_text().splitlines()]
            stacks += [p if p.is_absolute() else path.parent / p for p in map(Path, lines) if str(p) and str(p)[0] != "#"]
        elif path.is_dir():
            stacks += sorted(p for p in path.iterdir() if p.suffix in STACK_SUFFIXES and p.is_file())
        elif path.is_file():
            stacks.append(path)
        else:
            matches = sorted(Path().glob(text)) if not path.is_absolute() else sorted(Path("/").glob(text[1:]))
            if not matches:
                raise IcetideError(f"{text}: no such file, folder or matching path")
            stacks += [p for p in matches if p.is_file()]
    for stack in stacks:
        if not stack.is_file():
            raise IcetideError(f"{stack}: no such file")
    items += [_item_for_stack(s) for s in dict.fromkeys(stacks)]
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


def run_item(item: BatchItem, out_root: str, config_json: dict) -> dict:
    """Reconstruct one series into ``out_root/<name>`` (skipped when already finished); returns its summary row.

    Raises ``IcetideError`` (or any other error) when it fails, after removing its partial folder.
    """
    import warnings

    from .io import load_series, read_volume
    from .metrics import evaluate_reconstruction
    from .reconstruct import reconstruct

    out = Path(out_root) / item.name
    if (out / "report.json").is_file():
        return {"name": item.name, "status": "skipped (already done)", "seconds": 0.0, "epochs": None, "cc": None}
    partial = Path(out_root) / f".{item.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    t0 = time.monotonic()
    try:
        config = ReconstructConfig.model_validate(config_json)
        config.fit.device = _device_for_worker(config.fit.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if item.angles_deg is not None:
                from .io import write_tlt

                write_tlt(partial / "input.tlt", item.angles_deg)
                angles = partial / "input.tlt"
            else:
                angles = Path(item.angles) if item.angles else None
            if angles is None and item.mdoc is None:
                raise IcetideError(f"{item.stack}: no .tlt, .rawtlt or .mdoc beside it")
            series, _, _ = load_series(Path(item.stack), angles, None if angles else Path(item.mdoc),
                                       config.pixel_size_A, config.tilt_axis_angle_deg or None, None, False)
        report = reconstruct(series, config, partial, source_path=Path(item.stack))
        cc = None
        if item.truth is not None:
            from .io import read_mrc

            truth, _ = read_volume(item.truth)
            tomogram, _ = read_mrc(partial / "tomogram.mrc")
            if truth.shape == tomogram.shape:
                cc = evaluate_reconstruction(tomogram, truth)["cc"]
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {"name": item.name, "status": "done", "seconds": time.monotonic() - t0, "epochs": report["epochs"],
            "cc": cc}


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
) -> list[dict]:
    """Submit every item to the Dask ``client`` and collect one summary row per item (in ``items`` order).

    Rows: ``name``, ``status`` (``done``, ``skipped (already done)`` or ``failed: <reason>``), ``seconds``,
    ``epochs``, ``cc`` (with the truth, when found). ``on_result`` is called as each row arrives.
    """
    from distributed import as_completed

    out_root.mkdir(parents=True, exist_ok=True)
    config_json = config.model_dump(mode="json")
    futures = {
        client.submit(run_item, item, str(out_root), config_json, key=f"icetide-{item.name}-{time.time_ns()}",
                      retries=retries, pure=False): item
        for item in items
    }
    rows: dict[str, dict] = {}
    for future in as_completed(futures):
        item = futures[future]
        try:
            row = future.result()
        except Exception as exc:  # one failed series never stops the others
            row = {"name": item.name, "status": f"failed: {_failure_text(exc)}", "seconds": None, "epochs": None,
                   "cc": None}
        row["stack"] = item.stack
        rows[item.name] = row
        if on_result is not None:
            on_result(row)
    return [rows[item.name] for item in items]
