"""A real cryo-ET tilt series end to end: EMPIAR-10499 tilt series 00254 against its published IMOD alignment.

Runs the command of docs/REAL_DATA.md on ``../shared/data/real/empiar10499_00254`` (raw counts, 41 tilts of
652 x 630 px at 10 A) and prints JSON: the even/odd-tilt FSC score (icetide.consistency.even_odd_fsc, at the
fit's sampling) of the raw stack, of the stack aligned by the published ``00254.xf`` and by icetide's
``00254.stack.xf`` (each applied to the unbinned stack, then binned as the fit was); the bead sharpness of the
same three (icetide.prealign.sharpness: the 99.99th percentile of the standardised FBP, the gold beads; a
misalignment blurs them); the gold-bead residual of the two aligned stacks (icetide.beads.track_beads: the
mean distance, in pixels of the fit's sampling, between each bead as seen and its best 3-D position projected,
with the stack's alignment as it is, and after the best per-view shifts, and the RMS of those shifts in pixels
of 10 A); the mean in-plane rotation of both (the tilt axis, degrees); the RMS difference of icetide's shifts to the published ones after the best
3-D translation (pixels of 10 A), and how much of it is the tilt axis' lateral position
(``axis_position_to_published_px``: the shift across the axis common to every view by which icetide places the
axis apart from the published alignment, and the RMS left once it is removed too; the per-view difference
across and along the axis), with the published alignment moved to icetide's axis position and icetide's moved to
the published one, each scored like the others; the fit time. Skips (exit 0, a JSON note)
when the data are absent.

    python benchmarks/real_cryo.py --out real            # fit (at most --max-minutes) + scores
    python benchmarks/real_cryo.py --out real --score-only --figure docs/figures/real_cryo.png
    python benchmarks/real_cryo.py --out real_xf --from-published   # the fit started from the published .xf
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from icetide.alignment import xf_to_deformations
from icetide.beads import track_beads
from icetide.consistency import even_odd_fsc
from icetide.data import TiltSeries
from icetide.deform import Deformations, remove_gauge
from icetide.io import read_mrc, read_tlt
from icetide.io.imod import read_xf
from icetide.prealign import sharpness
from icetide.classical import align_series, fbp, standardised

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "empiar10499_00254"


def aligned_binned(stack: np.ndarray, angles: np.ndarray, xf: np.ndarray | None, factor: int) -> np.ndarray:
    """``stack`` resampled by ``xf`` (None: raw) at full size, then binned by ``factor``."""
    if xf is not None:
        d = xf_to_deformations(xf, angles, stack.shape[1:], non_rotation="nearest")
        stack = align_series(torch.tensor(stack), d).numpy()
    return TiltSeries(stack, angles).binned(factor).images


def score(binned: np.ndarray, angles: np.ndarray, thickness: int) -> dict:
    """Even/odd FSC of an aligned, binned stack (``score``, ``frequency``, ``fsc``)."""
    return even_odd_fsc(binned, Deformations.identity(angles, binned.shape[1:]), thickness)


def figure(stacks: dict, curves: dict, angles: np.ndarray, thickness: int, path: Path) -> None:
    """Slices through the FBP of each aligned stack (the bead layer, the cell's middle, XZ) and the FSC curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(stacks)
    fig, axes = plt.subplots(3, len(names) + 1, figsize=(4.2 * (len(names) + 1), 11))
    for col, name in enumerate(names):
        volume = fbp(standardised(torch.tensor(stacks[name])), angles, thickness).numpy()
        structure = volume.std(axis=(1, 2))
        beads = int(np.argmax(structure))
        middle = int(np.argmin(structure[thickness // 4 : 3 * thickness // 4])) + thickness // 4
        for row, (view, title) in enumerate([
            (volume[max(0, beads - 2) : beads + 3].mean(0), f"{name}: bead layer (z {beads})"),
            (volume[max(0, middle - 2) : middle + 3].mean(0), f"{name}: z {middle}"),
            (volume[:, volume.shape[1] // 2 - 2 : volume.shape[1] // 2 + 3].mean(1), f"{name}: XZ"),
        ]):
            low, high = np.percentile(view, [1, 99])
            axes[row, col].imshow(view, cmap="gray", vmin=low, vmax=high, aspect="equal")
            axes[row, col].set_title(title, fontsize=9)
            axes[row, col].axis("off")
    for name, curve in curves.items():
        axes[0, -1].plot(curve["frequency"], curve["fsc"], label=f"{name} ({curve['score']:.3f})")
    axes[0, -1].set_xlabel("cycles per voxel")
    axes[0, -1].set_title("even/odd-tilt FSC (score: mean up to half Nyquist)", fontsize=9)
    axes[0, -1].legend(fontsize=8)
    for ax in axes[1:, -1]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def shift_rms(xf_a: np.ndarray, xf_b: np.ndarray, angles: np.ndarray) -> float:
    """RMS of the difference of two .xf's shifts after removing the best-fitting 3-D translation, pixels."""
    residual, _ = remove_gauge(xf_b[:, :, 2] - xf_a[:, :, 2], angles)
    return float(np.sqrt((residual**2).sum(axis=1).mean()))


def axis_position_offset(xf_a: np.ndarray, xf_b: np.ndarray, angles: np.ndarray) -> tuple[float, float, np.ndarray]:
    """The shift across the tilt axis common to every view (pixels) by which ``xf_b`` places the axis apart from
    ``xf_a``, the RMS difference of their shifts once it and the best 3-D translation are removed, and that
    difference per view ``(M, 2)``: across the axis, along it.

    In each view's axis frame (the shift turned by ``-alpha``), the difference across the axis is fitted by
    ``c + dx cos(theta) + dz sin(theta)`` and along it by its mean: ``c`` moves the axis sideways, which no
    translation of the volume undoes (``c (1 - cos(theta))`` is left after the best ``dx``)."""
    def axis_frame(xf: np.ndarray) -> np.ndarray:
        a = -np.arctan2(xf[:, 1, 0], xf[:, 0, 0])
        shift = xf[:, :, 2]
        return np.stack([np.cos(a) * shift[:, 0] - np.sin(a) * shift[:, 1],
                         np.sin(a) * shift[:, 0] + np.cos(a) * shift[:, 1]], 1)

    t = np.deg2rad(angles)
    diff = axis_frame(xf_b) - axis_frame(xf_a)
    design = np.stack([np.ones_like(t), np.cos(t), np.sin(t)], 1)
    coef, *_ = np.linalg.lstsq(design, diff[:, 0], rcond=None)
    across = diff[:, 0] - design @ coef
    along = diff[:, 1] - diff[:, 1].mean()
    return float(coef[0]), float(np.sqrt((across**2 + along**2).mean())), np.stack([across, along], 1)


def moved_across_axis(xf: np.ndarray, offset_px: float) -> np.ndarray:
    """``xf`` with every view's shift moved by ``offset_px`` across the tilt axis (its axis frame's x)."""
    a = np.arctan2(xf[:, 1, 0], xf[:, 0, 0])
    out = xf.copy()
    out[:, 0, 2] += offset_px * np.cos(a)
    out[:, 1, 2] += offset_px * np.sin(a)
    return out


def mean_rotation_deg(xf: np.ndarray) -> float:
    return float(np.degrees(np.arctan2(xf[:, 1, 0], xf[:, 0, 0])).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder of the reconstruction")
    parser.add_argument("--bin", type=int, default=2)
    parser.add_argument("--thickness", type=int, default=150, help="voxels at the binned sampling")
    parser.add_argument("--tilt-axis-angle", type=float, default=-4.3,
                        help="start of the tilt axis, icetide's convention (the published .xf: -4.3)")
    parser.add_argument("--max-minutes", type=float, default=15.0)
    parser.add_argument("--score-only", action="store_true", help="score an existing run in --out")
    parser.add_argument("--figure", type=Path, help="write slices and FSC curves to this PNG")
    parser.add_argument("--config", type=Path, help="a settings file passed on to reconstruct --config")
    parser.add_argument("--from-published", action="store_true",
                        help="start the fit from the published alignment (reconstruct --xf 00254.xf)")
    args = parser.parse_args()
    stack_path, tlt_path = DATA / "00254.stack.mrc", DATA / "00254.tlt"
    if not stack_path.is_file():
        print(json.dumps({"skipped": f"{DATA} is not available"}))
        return
    # A start alignment holds the axis in its rotations: reconstruct refuses --tilt-axis-angle beside it.
    start = (["--xf", str(DATA / "00254.xf")] if args.from_published
             else ["--tilt-axis-angle", str(args.tilt_axis_angle)])
    command = [
        "icetide", "reconstruct", str(stack_path), "--angles", str(tlt_path), "--invert", "--bin", str(args.bin),
        *start, "--thickness", str(args.thickness), "--max-minutes", str(args.max_minutes), "-o", str(args.out),
    ] + ([] if args.config is None else ["--config", str(args.config)])
    wall = None
    if not args.score_only:
        t0 = time.monotonic()
        subprocess.run(command + ["--force"], check=True, stdout=sys.stderr)
        wall = time.monotonic() - t0
    stack, _ = read_mrc(stack_path)
    angles = read_tlt(tlt_path)
    published = read_xf(DATA / "00254.xf")
    report = json.loads((args.out / "report.json").read_text())
    ours = read_xf(args.out / f"{report['outputs']['stem']}.xf")
    offset, rms_after_offset, by_view = axis_position_offset(published, ours, angles)
    moved = {"published .xf, axis at icetide's position": moved_across_axis(published, offset),
             "icetide, axis at the published position": moved_across_axis(ours, -offset)}
    stacks = {name: aligned_binned(-stack, angles, xf, args.bin)
              for name, xf in (("raw", None), ("published .xf", published), ("icetide", ours), *moved.items())}
    curves = {name: score(binned, angles, args.thickness) for name, binned in stacks.items()}
    beads = {name: sharpness(torch.tensor(binned), angles, Deformations.identity(angles, binned.shape[1:]),
                             args.thickness) for name, binned in stacks.items()}
    residuals = {}
    for name in ("published .xf", "icetide", *moved):
        found = track_beads(torch.tensor(stacks[name]), angles, args.thickness)
        residuals[name] = {k: found.get(k) for k in ("beads", "residual_start_px", "residual_px")}
        if "shifts_px" in found:  # how far the beads' own shifts lie from this alignment, pixels of 10 A
            residuals[name]["bead_shifts_rms_px"] = float(np.sqrt((found["shifts_px"] ** 2).sum(1).mean()) * args.bin)
    if args.figure is not None:
        shown = ("raw", "published .xf", "icetide")
        figure({k: stacks[k] for k in shown}, {k: curves[k] for k in shown}, angles, args.thickness, args.figure)
    result = {
        "command": " ".join(command),
        "fsc_score": {name: curve["score"] for name, curve in curves.items()},
        "bead_sharpness": beads,
        "bead_residual": residuals,
        "tilt_axis_search": report.get("tilt_axis_search", {}).get("estimate_deg"),
        "tilt_axis_refinement": {k: report.get("tilt_axis_refinement", {}).get(k)
                                 for k in ("used", "offset_px", "offset_used", "estimate_deg", "note")},
        "tilt_axis_rotation_deg": {"published_xf": mean_rotation_deg(published), "icetide": mean_rotation_deg(ours)},
        "shift_rms_to_published_px": shift_rms(published, ours, angles),
        "axis_position_to_published_px": offset,
        "shift_rms_to_published_after_axis_position_px": rms_after_offset,
        "shift_difference_by_view_px": {"tilt_deg": angles.round(2).tolist(),
                                        "across_axis": by_view[:, 0].round(2).tolist(),
                                        "along_axis": by_view[:, 1].round(2).tolist()},
        "fit_seconds": report["fit_seconds"],
        "epochs": report["epochs"],
        "stop_reason": report["stop_reason"],
        "start_check": report.get("start_check"),
        "wall_seconds": wall,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
