"""icetide: joint alignment and implicit-volume reconstruction of cryo-ET tilt series (ICE-TIDE)."""

from .data import TiltSeries
from .deform import Deformations
from .errors import IcetideError

__version__ = "0.1.0"

__all__ = ["TiltSeries", "Deformations", "IcetideError", "__version__"]
