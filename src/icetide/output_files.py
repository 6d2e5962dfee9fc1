"""The names of the files a reconstruction writes, after the tilt series' stem as IMOD names them.

A series ``TS_07.mrc`` (or ``TS_07.st``, or a RELION-5 series ``TS_07.star``) gives ``TS_07.xf``, ``TS_07.tlt``,
``TS_07.exclude``, ``TS_07.star``, ``TS_07_ali.mrc`` (the aligned stack), ``TS_07_rec.mrc`` (icetide's tomogram),
``TS_07_fbp.mrc`` (FBP of the aligned stack) and ``TS_07_half1.mrc``/``TS_07_half2.mrc``, so that tomograms
pooled from many folders keep distinct names. ``tomogram.mrc`` and ``aligned.mrc`` are relative links to the
tomogram and the aligned stack, the same in every folder, for scripts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# The stem of a series known by no file (a library call with a TiltSeries only).
DEFAULT_STEM = "tilt_series"
# The links that name the main outputs the same in every folder.
TOMOGRAM_LINK = "tomogram.mrc"
ALIGNED_LINK = "aligned.mrc"


@dataclass(frozen=True)
class OutputNames:
    """File names (not paths) of one reconstruction's outputs for a series called ``stem``."""

    stem: str

    @classmethod
    def for_source(cls, source_path: Path | str | None) -> OutputNames:
        """Names after ``source_path`` (the stack, or a RELION-5 per-series STAR) less its last suffix, spaces
        replaced by ``_``; :data:`DEFAULT_STEM` without a file."""
        if source_path is None:
            return cls(DEFAULT_STEM)
        return cls(Path(source_path).stem.replace(" ", "_") or DEFAULT_STEM)

    @property
    def xf(self) -> str:
        return f"{self.stem}.xf"

    @property
    def tlt(self) -> str:
        return f"{self.stem}.tlt"

    @property
    def exclude(self) -> str:
        return f"{self.stem}.exclude"

    @property
    def star(self) -> str:
        return f"{self.stem}.star"

    @property
    def aligned(self) -> str:
        return f"{self.stem}_ali.mrc"

    @property
    def tomogram(self) -> str:
        return f"{self.stem}_rec.mrc"

    @property
    def fbp(self) -> str:
        return f"{self.stem}_fbp.mrc"

    def half(self, k: int) -> str:
        """The half tomogram ``k`` (1 or 2)."""
        return f"{self.stem}_half{k}.mrc"


def link_short_names(out_dir: Path, names: OutputNames) -> list[str]:
    """Point ``tomogram.mrc`` and ``aligned.mrc`` in ``out_dir`` at the tomogram and the aligned stack (relative
    links, replacing older ones); returns the links made. Where the file system has no links, says so and goes on."""
    made = []
    for link, target in ((TOMOGRAM_LINK, names.tomogram), (ALIGNED_LINK, names.aligned)):
        path = Path(out_dir) / link
        if link == target or not (Path(out_dir) / target).exists():
            continue
        try:
            path.unlink(missing_ok=True)
            path.symlink_to(target)
        except OSError as exc:
            log.warning("could not link %s to %s (%s); the file itself is %s", link, target, exc, target)
            continue
        made.append(link)
    return made
