"""The options of ``icetide reconstruct``: each declared once (type, flags and help) and gathered in
:class:`ReconstructOptions`, which the command's steps take instead of some forty separate arguments."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

TiltSeriesArg = Annotated[Path, typer.Argument(
    help="Tilt series, MRC stack (n_tilts, ny, nx), any MRC mode; or an AreTomo3 output folder, whose "
        "stack, _TLT.txt angles, .aln (starting alignment), _CTF.txt (defocus) and _ODD/_EVN.mrc (half series) are "
        "used where no option says otherwise (views at its dark frames' tilts are excluded); or a RELION-5 "
        "tilt-series STAR (.star, e.g. CtfFind/job003/tilt_series_ctf.star of a MotionCorr or later job), whose "
        "micrographs (stacked in order of tilt angle), angles, pixel size, tilt axis, pre-exposure, defocus, "
        "even/odd sums (half series), optics and defocus hand are used where no option says otherwise.")]
AretomoNameOption = Annotated[Optional[str], typer.Option(
    "--aretomo-name", help="Which tilt series of an AreTomo3 output folder holding several (its X of X.aln).")]
RelionNameOption = Annotated[Optional[str], typer.Option(
    "--relion-name", help="Which tilt series of a RELION-5 tilt-series STAR listing several (its "
        "rlnTomoName).")]
AnglesOption = Annotated[Optional[Path], typer.Option(
    "--angles", "-a", help="Tilt angles in degrees, IMOD .tlt/.rawtlt (one per line, stack order).")]
OutOption = Annotated[Path, typer.Option(
    "--out", "-o", help="Output folder (created; must be empty unless --force/--resume).")]
MdocOption = Annotated[Optional[Path], typer.Option(
    help="SerialEM .mdoc instead of --angles: tilt angles, and the pixel size and tilt-axis angle if given.")]
ThicknessOption = Annotated[Optional[int], typer.Option(
    help="Slab thickness in voxels of the tomogram (at the --bin sampling). Default: half the smaller "
        "detector side.")]
BinOption = Annotated[Optional[int], typer.Option(
    "--bin", help="Fit the stack binned by N (N x N block averages); the tomograms, the aligned stack and the "
        "FBP are at that sampling, the .xf, .star and deformations.json in the input stack's pixels. Default 1.")]
PixelSizeOption = Annotated[Optional[float], typer.Option(help="Pixel size in Angstrom (overrides the MRC header).")]
TiltAxisAngleOption = Annotated[Optional[float], typer.Option(
    help="Tilt-axis direction on the images, degrees counter-clockwise from the image Y axis. Default 0.")]
TiltAxisSearchOption = Annotated[Optional[float], typer.Option(
    help="Search the tilt-axis direction within +-this many degrees of --tilt-axis-angle (or the .mdoc's) "
        "before the fit, by the sharpness of the coarsely aligned FBP (deform.axis_search); 0 = off. Default 4. "
        "The estimate is in report.json.")]
ExcludeOption = Annotated[Optional[str], typer.Option(
    help="Views to leave out: stack indices numbered from 0, single or as ranges, e.g. 0-2,40. The fit, "
        "STEM_ali.mrc and STEM.star hold the other views; STEM.xf/.tlt keep a line per view of the stack and "
        "STEM.exclude lists the excluded ones for IMOD's EXCLUDELIST (numbered from 1, e.g. 1-3,41).")]
InvertOption = Annotated[bool, typer.Option(
    "--invert", help="Flip the contrast first (raw cryo-EM images show density dark on light).")]
PolarityOption = Annotated[Optional[str], typer.Option(
    help="Density polarity of the volumes and STEM_ali.mrc: bright (default: dense = bright, positive) "
        "or input (as in the input images: dense = dark with --invert). The MRC header label states it.")]
FixNonfiniteOption = Annotated[bool, typer.Option(
    "--fix-nonfinite", help="Replace NaN/Inf pixels by their image's median (warns) instead of refusing.")]
ConfigOption = Annotated[Optional[Path], typer.Option(
    help="YAML file with any subset of the settings (see config.yaml of a run).")]
EpochsOption = Annotated[Optional[int], typer.Option(
    help="Maximum number of epochs (passes over every tilt). Default 500; early stopping usually ends sooner.")]
MaxMinutesOption = Annotated[Optional[float], typer.Option(help="Stop after this many minutes of fitting.")]
MaxMemoryOption = Annotated[Optional[float], typer.Option(
    "--max-memory", help="GiB (2**30 bytes) a fit may plan for (CPU RAM or GPU memory); default 70% of "
        "what is available. Out-of-memory errors shrink the batch and retry.")]
RendererOption = Annotated[Optional[str], typer.Option(
    help="Forward model: lattice (default, fast) or rays (the paper's).")]
SpecimenOption = Annotated[Optional[str], typer.Option(
    help="box (default: nothing outside the field of view) or slab (the specimen extends sideways "
        "beyond it, as a lamella or ice film does: modelled wider, slower).")]
DeviceOption = Annotated[Optional[str], typer.Option(help="auto (default: CUDA if available), cpu, cuda or cuda:N.")]
HalfMapsOption = Annotated[Optional[str], typer.Option(
    "--half-maps", help="tilts, pixels or series: fit two volumes on disjoint halves of the data "
        "(alternate tilts, a random half of every image, or the two half series of --half-series) with the "
        "deformations from all of it; writes STEM_half1/2.mrc and fsc_halves.png, the resolution at FSC 0.143 "
        "in report.json (STEM_rec.mrc is their mean). About twice the fitting time.")]
HalfSeriesOption = Annotated[Optional[Path], typer.Option(
    "--half-series", help="A second half series of the same acquisition (e.g. TILT_SERIES from the odd "
        "frames, this one from the even frames, both averaged to the full exposure); implies --half-maps series. "
        "STEM_ali.mrc and the FBP are of their mean.")]
LossOption = Annotated[Optional[str], typer.Option(
    help="Data term: l1 (default, the paper's), l2, or poisson for counting data of very low dose "
        "(below about 1 count per pixel; docs/RESULTS.md).")]
MixedPrecisionOption = Annotated[bool, typer.Option(
    "--mixed-precision", help="On CUDA: hash table read in fp16 and MLP in bf16 (fp32 parameters and "
        "gradients): faster and less GPU memory (docs/BENCHMARKS.md \"GPU\"). No effect on CPU.")]
SeedOption = Annotated[Optional[int], typer.Option(
    help="Random seed (default 0); CPU runs are reproducible for a seed.")]
NoLocalOption = Annotated[bool, typer.Option("--no-local", help="Do not estimate local deformation fields.")]
DeformationsOption = Annotated[Optional[Path], typer.Option(
    help="Starting deformations (deformations.json), e.g. from another run.")]
XfOption = Annotated[Optional[Path], typer.Option(
    "--xf", help="Starting alignment from IMOD .xf (shifts and rotations; the tilt axis is in it).")]
AlnOption = Annotated[Optional[Path], typer.Option(
    "--aln", help="Starting alignment from AreTomo .aln (global part; rows matched by tilt angle).")]
DefocusOption = Annotated[Optional[Path], typer.Option(
    help="Per-view defocus: CTFFIND4 output (.txt), IMOD .defocus, RELION-5 tilt-series .star or SerialEM "
        ".mdoc (its nominal Defocus). The series is phase-flipped before the fit (--ctf-correction).")]
CtfCorrectionOption = Annotated[Optional[str], typer.Option(
    help="With --defocus: phaseflip (default; in effect strips parallel to the tilt axis, as the "
        "defocus varies across a tilted image), model (fit the raw images with the CTF in the forward model: "
        "0.87-0.91 in CC against 0.69-0.72 for phaseflip in docs/RESULTS.md section 9, default renderer, one process; "
        "on the realistic acquisitions of section 11 phaseflip aligned better) or none.")]
DefocusHandOption = Annotated[Optional[int], typer.Option(
    help="1 (default) or -1: which side of a tilted image is further underfocus (docs/CONVENTIONS.md); "
        "flip it when the tilt sign of the data is the opposite.")]
PreExposureOption = Annotated[Optional[Path], typer.Option(
    help="Exposure before each view (e/A^2): SerialEM .mdoc (PriorRecordDose, or ExposureDose in "
        "DateTime order), RELION-5 .star (rlnMicrographPreExposure) or one number per line.")]
ExposureWeightingOption = Annotated[bool, typer.Option(
    "--exposure-weighting", help="Weight each view's spectrum by its accumulated exposure (Grant & "
        "Grigorieff critical exposure). Needs --pre-exposure, or an --mdoc with doses.")]
VoltageOption = Annotated[Optional[float], typer.Option(
    help="Acceleration voltage, kV (CTF, tomograms.star). Default 300.")]
CsOption = Annotated[Optional[float], typer.Option(help="Spherical aberration, mm (CTF, tomograms.star). Default 2.7.")]
AmplitudeContrastOption = Annotated[Optional[float], typer.Option(
    help="Amplitude contrast (CTF, tomograms.star). Default 0.07.")]
ResumeOption = Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoint.pt with OUT's config.yaml.")]


@dataclass
class ReconstructOptions:
    """Every option of ``icetide reconstruct`` as given (``None``: not given)."""

    tilt_series: Path
    out: Path
    aretomo_name: Optional[str] = None
    relion_name: Optional[str] = None
    angles: Optional[Path] = None
    mdoc: Optional[Path] = None
    thickness: Optional[int] = None
    bin: Optional[int] = None
    pixel_size: Optional[float] = None
    tilt_axis_angle: Optional[float] = None
    tilt_axis_search: Optional[float] = None
    exclude: Optional[str] = None
    invert: bool = False
    polarity: Optional[str] = None
    fix_nonfinite: bool = False
    config: Optional[Path] = None
    epochs: Optional[int] = None
    max_minutes: Optional[float] = None
    max_memory: Optional[float] = None
    renderer: Optional[str] = None
    specimen: Optional[str] = None
    device: Optional[str] = None
    half_maps: Optional[str] = None
    half_series: Optional[Path] = None
    loss: Optional[str] = None
    mixed_precision: bool = False
    seed: Optional[int] = None
    no_local: bool = False
    deformations: Optional[Path] = None
    xf: Optional[Path] = None
    aln: Optional[Path] = None
    defocus: Optional[Path] = None
    ctf_correction: Optional[str] = None
    defocus_hand: Optional[int] = None
    pre_exposure: Optional[Path] = None
    exposure_weighting: bool = False
    voltage: Optional[float] = None
    cs: Optional[float] = None
    amplitude_contrast: Optional[float] = None
    resume: bool = False
    force: bool = False
