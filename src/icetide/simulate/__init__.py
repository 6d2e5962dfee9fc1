"""Phantoms and tilt-series acquisition with known truth (docs/CONVENTIONS.md "Simulation protocol")."""

from .acquire import (
    PROFILES,
    DeformationProfile,
    SimulatedTiltSeries,
    add_noise,
    measure_snr_db,
    project_deformed,
    random_deformations,
    simulate_tilt_series,
)
from .optics import Optics
from .phantom import bin_volume, crowded_phantom

__all__ = [
    "crowded_phantom",
    "bin_volume",
    "DeformationProfile",
    "PROFILES",
    "random_deformations",
    "project_deformed",
    "add_noise",
    "measure_snr_db",
    "SimulatedTiltSeries",
    "simulate_tilt_series",
    "Optics",
]
