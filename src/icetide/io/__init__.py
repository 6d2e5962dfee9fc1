"""File formats. Nothing outside this package reads or writes a file format."""

from .deformations import read_deformations, write_deformations
from .imod import read_tlt, write_tlt
from .mrc import read_mrc, write_mrc
from .util import atomic_path, write_json

__all__ = [
    "read_mrc",
    "write_mrc",
    "read_tlt",
    "write_tlt",
    "read_deformations",
    "write_deformations",
    "atomic_path",
    "write_json",
]
