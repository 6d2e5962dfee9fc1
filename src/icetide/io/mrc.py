"""MRC volumes and image stacks (via ``mrcfile``), with the voxel size in Angstrom."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import mrcfile
import numpy as np

from ..errors import IcetideError
from .util import atomic_path


def read_mrc(path: str | os.PathLike) -> tuple[np.ndarray, float | None]:
    """Read an MRC file (any mode; ``.mrc.gz`` too) as float32 ``(nz, ny, nx)`` (a 2-D file gives ``(ny, nx)``).

    Returns ``(data, voxel_size_A)``; the voxel size is ``None`` when the header holds none (0 or 1 A, the
    values writers put when they know nothing). Old or non-conforming headers are read in permissive mode
    with a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise IcetideError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r") as m:
                data, vs = np.asarray(m.data), m.voxel_size
    except Exception:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with mrcfile.open(path, mode="r", permissive=True) as m:
                    if m.data is None:
                        raise ValueError("no data")
                    data, vs = np.asarray(m.data), m.voxel_size
        except Exception as exc:
            raise IcetideError(f"{path}: not a readable MRC file ({exc})") from None
        warnings.warn(f"{path}: non-conforming MRC header, read in permissive mode", stacklevel=2)
    voxel = float(vs.x)
    voxel_size = None if voxel in (0.0, 1.0) or not np.isfinite(voxel) else voxel
    return data.astype(np.float32, copy=False), voxel_size


def read_mrc_images(paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, float | None]:
    """One 2-D image per file (e.g. RELION's motion-corrected micrographs, one per tilt), stacked in the given
    order: float32 ``(M, ny, nx)`` and the first file's pixel size in Angstrom (``None`` when its header holds
    none). A file holding more than one image, or images of different shapes, raise naming the file."""
    stack: np.ndarray | None = None
    pixel_size: float | None = None
    for k, path in enumerate(paths):
        image, voxel = read_mrc(path)
        if image.ndim == 3 and image.shape[0] == 1:  # a one-slice stack
            image = image[0]
        if image.ndim != 2:
            raise IcetideError(f"{path}: expected one 2-D image, got shape {image.shape}")
        if stack is None:
            stack = np.empty((len(paths), *image.shape), dtype=np.float32)
            pixel_size = voxel
        elif image.shape != stack.shape[1:]:
            raise IcetideError(f"{path}: image of {image.shape[0]} x {image.shape[1]} pixels, the first of the "
                               f"series ({paths[0]}) has {stack.shape[1]} x {stack.shape[2]}")
        stack[k] = image
    if stack is None:
        raise IcetideError("no image files to read")
    return stack, pixel_size


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, float | None]:
    """:func:`read_mrc` for a 3-D volume: refuses 2-D data and NaN/Inf with one-line errors."""
    volume, voxel_size_A = read_mrc(path)
    if volume.ndim != 3:
        raise IcetideError(f"{path}: expected a 3-D volume (nz, ny, nx), got shape {volume.shape}")
    if not np.all(np.isfinite(volume)):
        raise IcetideError(f"{path}: the volume contains NaN or Inf")
    return volume, voxel_size_A


def write_mrc(
    path: str | os.PathLike, data: np.ndarray, voxel_size_A: float | None = None, *, stack: bool = False,
    label: str | None = None,
) -> None:
    """Write a float32 MRC (mode 2) atomically; ``data`` is ``(nz, ny, nx)`` or ``(ny, nx)``.

    The voxel (pixel) size in Angstrom goes into the header. ``stack=True`` marks a tilt series
    ``(n_tilts, ny, nx)`` as an image stack (``ispg = 0``); otherwise 3-D data is a volume (``ispg = 1``).
    ``label``: the header's first text label (at most 80 ASCII characters, the MRC limit).
    """
    if label is not None and (len(label) > 80 or not label.isascii()):
        raise IcetideError(f"an MRC label holds at most 80 ASCII characters, got {label!r}")
    arr = np.ascontiguousarray(np.asarray(data, dtype=np.float32))
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as m:
            m.set_data(arr)
            if stack:
                m.set_image_stack()
            elif arr.ndim == 3:
                m.set_volume()
            if voxel_size_A is not None:
                m.voxel_size = float(voxel_size_A)
            if label is not None:
                m.add_label(label)
            m.update_header_stats()


def read_mrc_labels(path: str | os.PathLike) -> list[str]:
    """The text labels of an MRC file's header (at most 10 of 80 characters), trailing blanks removed."""
    path = Path(path)
    if not path.is_file():
        raise IcetideError(f"{path}: no such file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(path, mode="r", header_only=True, permissive=True) as m:
            return [label.rstrip() for label in m.get_labels()]
