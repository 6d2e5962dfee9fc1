"""File formats. Nothing outside this package reads or writes a file format."""

from .aretomo import AlnFile, AreTomo3Series, aretomo3_series, read_aln
from .ctf_files import DefocusTable, read_defocus, read_pre_exposure, write_imod_defocus, write_pre_exposure
from .deformations import read_deformations, write_deformations
from .imod import imod_view_list, parse_exclude, read_tlt, read_xf, write_tlt, write_view_list, write_xf
from .mdoc import read_mdoc, write_mdoc
from .mrc import read_mrc, read_mrc_images, read_mrc_labels, read_volume, write_mrc
from .series import load_series, read_series
from .relion import (
    RelionTomogram,
    read_relion_tilt_series_star,
    read_relion_tomograms_star,
    write_relion_tilt_series_star,
    write_relion_tomograms_star,
)
from .relion_project import RelionTiltSeries, read_relion_project, relion_series
from .util import atomic_path, write_json

__all__ = [
    "read_mrc",
    "read_mrc_images",
    "read_mrc_labels",
    "read_volume",
    "write_mrc",
    "read_tlt",
    "write_tlt",
    "read_xf",
    "write_xf",
    "imod_view_list",
    "write_view_list",
    "AlnFile",
    "read_aln",
    "AreTomo3Series",
    "aretomo3_series",
    "read_mdoc",
    "write_mdoc",
    "DefocusTable",
    "read_defocus",
    "write_imod_defocus",
    "read_pre_exposure",
    "write_pre_exposure",
    "RelionTomogram",
    "read_relion_tilt_series_star",
    "write_relion_tilt_series_star",
    "read_relion_tomograms_star",
    "write_relion_tomograms_star",
    "RelionTiltSeries",
    "read_relion_project",
    "relion_series",
    "read_deformations",
    "write_deformations",
    "atomic_path",
    "write_json",
    "load_series",
    "read_series",
    "parse_exclude",
]
