"""The joint optimisation of the implicit volume and the per-tilt deformations (paper section II.C).

Loss: mean absolute error between predicted and observed pixel values (exact pixel centres; the data are
never interpolated) plus the deformation penalty of paper eq. 7 on the deviation from the starting
deformations. Adam with one learning rate per parameter group (volume, shifts, rotations, local fields);
deformations are frozen for ``warmup_epochs``; every learning rate is multiplied by ``lr_decay_factor`` every
``lr_decay_every`` epochs. A random ``validation_fraction`` of the pixels is held out; after each validation
pass the best state so far is kept, and fitting stops after ``patience`` passes without improvement, counted
once every deformation is released (after ``warmup_epochs`` and, with local fields, ``local_delay_epochs``).

Coarse-to-fine sampling (``binned_epochs``): the first epochs fit the series binned by 2 (:func:`bin_by_two`),
predicted from the field on every other voxel, a quarter of the pixels and an eighth of the field evaluations;
the deformations keep their unbinned units (the binned pixel centres are deformed, then halved). By default the
encoding's levels enter one after another over the planned binned stage (``coarse_to_fine_epochs``).

A step whose loss or gradient norm is not finite is skipped: the model and both optimisers go back to the
"last good" state (taken after every completed epoch), every learning rate is halved for the rest of the fit,
and the event is listed in ``report["rollbacks"]`` (epoch and step counted from 1, reason, learning-rate factor
after the halving). After ``max_rollbacks`` of these the next one ends the fit ("numerical failure") with the
best state so far.

The modules follow the loop:

- :mod:`.problem`: the observed series as the fit sees it (normalisation, held-out and half masks, sampling
  scales);
- :mod:`.deformation_model`: the deformations, one object owning its tensors, start, penalty and groups;
- :mod:`.forward`: the forward model (deformations, renderer, CTF, gains) and the data term (:mod:`.loss`);
- :mod:`.schedule`: learning rates, binned stage, level weights, early stopping;
- :mod:`.memory`: the memory plan; :mod:`.ranks`: what data-parallel ranks exchange; :mod:`.numerics`: the
  guard against non-finite steps;
- :mod:`.fitter`: the parts put together, an epoch and a validation; :mod:`.loop`: the epochs
  (:func:`run_fit`);
- :mod:`.checkpoint`: the versioned checkpoint file; :mod:`.result`: the result and the report.
"""

from .fitter import Fitter
from .loop import run_fit
from .loss import POISSON_SHARPNESS, pixel_loss
from .memory import BYTES_PER_FIELD_POINT, auto_lattice_rows, field_bytes_per_point
from .problem import bin_by_two, robust_spread
from .result import FitResult

__all__ = [
    "BYTES_PER_FIELD_POINT", "FitResult", "Fitter", "POISSON_SHARPNESS", "auto_lattice_rows", "bin_by_two",
    "field_bytes_per_point", "pixel_loss", "robust_spread", "run_fit",
]
