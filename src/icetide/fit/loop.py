"""The loop over epochs: train, validate, keep the best state, stop (epoch budget, time budget, early stopping,
numerical failure, a signal), write checkpoints.

The binned stage (the first ``binned_epochs``) validates on the binned series and stops on its own
(:class:`icetide.fit.schedule.EarlyStopping`): its held-out loss is not comparable with the unbinned one. When it
ends (at its plan, or after ``fit.patience`` validations without improvement) the fit goes on unbinned from the
stage's best state, and the fit's own best state and early stopping start with the first unbinned epoch.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import Callable

from ..errors import IcetideError
from .fitter import Fitter
from .numerics import NumericalFailure
from .ranks import any_rank
from .result import FitResult, fit_result

__all__ = ["run_fit"]


def run_fit(
    fitter: Fitter, checkpoint_path: Path | None = None, on_epoch: Callable[[dict], None] | None = None
) -> FitResult:
    """Run ``fitter`` until the epoch budget, the time budget, early stopping or a numerical failure ends it;
    ``on_epoch`` gets a dict (epoch, train_loss, val_loss, elapsed_s, samples, binned) after every epoch; with
    ``checkpoint_path`` a checkpoint is written every ``fit.checkpoint_minutes``, on SIGINT/SIGTERM (which end
    the fit after the epoch) and at the end.

    Returns the best state (by validation loss, else the last good one). Raises ``IcetideError`` when the
    steps failed before any could be taken.
    """
    fit = fitter.config.fit
    deadline = None if fit.max_minutes is None else fit.max_minutes * 60
    last_ckpt = time.monotonic()
    stop_reason = "epochs"
    interrupted = {"signal": 0}

    def _on_signal(signum, frame):
        interrupted["signal"] = signum

    handlers = {}
    if checkpoint_path is not None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                handlers[sig] = signal.signal(sig, _on_signal)
            except ValueError:  # not in the main thread
                pass
    t_start = time.monotonic() - fitter.elapsed_s
    try:
        while fitter.epoch < fit.epochs:
            try:
                train_loss = fitter.train_epoch()
            except NumericalFailure as failure:
                if fitter.last_good["samples"] == 0:
                    raise IcetideError(
                        f"the fit never took a finite step ({failure}); lower the learning rates"
                    ) from None
                stop_reason = f"numerical failure: {failure}"
                break
            val_loss, binned_val_loss, binned = _validate(fitter)
            fitter.elapsed_s = time.monotonic() - t_start
            for key, value in zip(fitter.curves, (fitter.epoch, train_loss, val_loss, fitter.elapsed_s,
                                                  binned_val_loss)):
                fitter.curves[key].append(value)
            if on_epoch is not None:
                on_epoch({"epoch": fitter.epoch, "train_loss": train_loss, "val_loss": val_loss,
                          "elapsed_s": fitter.elapsed_s, "samples": fitter.samples, "binned": binned})
            if fitter.stopping.done:
                stop_reason = "early stopping (validation loss stopped improving)"
                break
            out_of_time = deadline is not None and fitter.elapsed_s >= deadline
            out_of_time, signum = any_rank(out_of_time, interrupted["signal"], fitter.device, fitter.world)
            if out_of_time:
                stop_reason = "time budget (--max-minutes)"
                break
            if signum:
                stop_reason = f"interrupted by signal {signum}"
                break
            if checkpoint_path is not None and time.monotonic() - last_ckpt >= fit.checkpoint_minutes * 60:
                fitter.save_checkpoint(checkpoint_path)
                last_ckpt = time.monotonic()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if checkpoint_path is not None:
        fitter.save_checkpoint(checkpoint_path)
    return fit_result(fitter, stop_reason)


def _validate(fitter: Fitter) -> tuple[float, float, bool]:
    """The validation after an epoch, if one is due: ``(val_loss, binned_val_loss, binned)`` (NaN where none).
    A binned epoch updates the binned stage's early stopping and may end the stage; an unbinned one the fit's."""
    fit = fitter.config.fit
    val_loss = binned_val_loss = math.nan
    validate = (fitter.epoch % fit.validate_every == 0 or fitter.epoch == fit.epochs) and fit.validation_fraction > 0
    binned = fitter.epoch <= fitter.binned_epochs  # the epoch just fitted
    if binned:
        stopping = fitter.binned_stopping
        if validate:
            binned_val_loss = fitter.epoch_validation_loss(fitter.scales[-1], fitter.epoch_rolled_back)
            stopping.update(binned_val_loss, fitter.snapshot, counts=fitter.epoch > fit.warmup_epochs)
        if stopping.done or fitter.epoch == fitter.binned_epochs:
            _end_binned_stage(fitter)
    elif validate:
        val_loss = fitter.epoch_validation_loss(fitter.scale, fitter.epoch_rolled_back)
        fitter.stopping.update(val_loss, fitter.snapshot, counts=fitter.epoch > fitter.release_epochs)
    return val_loss, binned_val_loss, binned


def _end_binned_stage(fitter: Fitter) -> None:
    """End the binned stage now (at its planned end, or earlier when ``fit.patience`` validations in a row did not
    improve its held-out loss: noisy data whose noise the volume starts to fit), going on unbinned from its best
    state."""
    stopping = fitter.binned_stopping
    if stopping.bad and stopping.best_state is not None:
        fitter.restore(stopping.best_state)
    fitter.binned_epochs = fitter.epoch
    stopping.best_state = None
