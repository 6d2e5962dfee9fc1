"""``icetide.log``: a plain-text record in an output folder of what ran, with which settings, and how it went.

:func:`run_log` appends a header (time, versions, host, command line, the settings that differ from the
defaults) to ``<folder>/icetide.log``, then every record of the ``icetide`` logger (and its children) logged
in the opening thread, Python warnings included, and the exception that ends the run, if one does. Appending
lets a resumed or repeated run add to the record of the earlier one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import platform
import shlex
import sys
import threading
import time
import traceback
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TextIO

from pydantic import BaseModel

from .errors import IcetideError

__all__ = ["LOG_NAME", "changed_settings", "epoch_lines", "logger", "run_log"]

LOG_NAME = "icetide.log"
logger = logging.getLogger("icetide")

_lock = threading.Lock()
_open: set[tuple[Path, int]] = set()  # (log file, thread) of every log open now
_saved: dict[str, Any] = {}  # the logger's level and warnings.showwarning, restored when the last log closes


class _Formatter(logging.Formatter):
    """``2025-01-31T12:00:00Z  message`` (UTC); warnings and errors say so, unexpected errors add the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        kind = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        text = f"{stamp}  {kind}{record.getMessage()}"
        return text + "\n" + self.formatException(record.exc_info) if record.exc_info else text


def _show_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` while a log is open: into the log, then shown as before."""
    logger.warning("%s (%s, %s:%s)", message, category.__name__, Path(filename).name, lineno)
    _saved["showwarning"](message, category, filename, lineno, file, line)


def changed_settings(config: BaseModel) -> dict[str, tuple[Any, Any]]:
    """The settings of ``config`` (a model whose fields all have defaults) that differ from the defaults:
    dotted key (``fit.epochs``) -> ``(value, default)``."""

    def flat(data: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
        return out

    now, default = flat(config.model_dump(mode="json")), flat(type(config)().model_dump(mode="json"))
    return {key: (value, default.get(key)) for key, value in now.items() if value != default.get(key)}


def _header(changed: Mapping[str, tuple[Any, Any]] | None) -> list[str]:
    import numpy
    import torch

    from . import __version__

    versions = f"python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}"
    lines = [f"icetide {__version__} on {platform.node()} ({versions})", f"command: {shlex.join(sys.argv)}"]
    if changed is None:  # a command of options alone: its command line says it all
        return lines
    lines.append("settings that differ from the defaults:" + ("" if changed else " none"))
    return lines + [f"  {key}: {value} (default: {default})" for key, (value, default) in changed.items()]


def _failure(exc: BaseException) -> tuple[str, bool]:
    """The log line of the exception that ended a run, and whether its traceback belongs in the log too
    (an unexpected error, not bad input or a lack of resources)."""
    if isinstance(exc, IcetideError):
        return str(exc), False
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", False
    return traceback.format_exception_only(type(exc), exc)[-1].strip(), not isinstance(exc, (OSError, MemoryError))


@contextlib.contextmanager
def run_log(folder: str | Path, changed: Mapping[str, tuple[Any, Any]] | None = None) -> Iterator[logging.Logger]:
    """Log this thread's run into ``folder/icetide.log`` (appended; ``folder`` must exist) while inside; yields
    the ``icetide`` logger.

    ``changed``: the settings that differ from the defaults (:func:`changed_settings`) for the header; ``None``
    for a command of options alone (its command line has them). Inside a log already open on ``folder`` in this
    thread it adds nothing (the outer one has the header). An exception leaving the block is logged as the last
    line. On the way out the handler is removed and, with the last open log, the logger's level and
    ``warnings.showwarning`` are restored.
    """
    path = (Path(folder) / LOG_NAME).resolve()
    thread = threading.get_ident()
    if (path, thread) in _open:
        yield logger
        return
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")  # flushed after every record
    handler.setFormatter(_Formatter())
    # Runs in other threads (a Dask worker's) log into their own folders.
    handler.addFilter(lambda record: record.thread == thread)
    with _lock:
        if not _open:
            _saved.update(level=logger.level, showwarning=warnings.showwarning)
            logger.setLevel(logging.INFO)
            warnings.showwarning = _show_warning
        _open.add((path, thread))
        logger.addHandler(handler)
    try:
        for line in _header(changed):
            logger.info(line)
        yield logger
    except BaseException as exc:
        message, trace = _failure(exc)
        logger.error(message, exc_info=exc if trace else None)
        raise
    finally:
        with _lock:
            logger.removeHandler(handler)
            _open.discard((path, thread))
            if not _open:
                logger.setLevel(_saved["level"])
                warnings.showwarning = _saved["showwarning"]
        handler.close()


def epoch_lines(
    total_epochs: int, max_minutes: float | None, emit: Callable[[str], None], every_epochs: int = 10,
    every_s: float = 30.0, clock: Callable[[], float] = time.monotonic,
) -> Callable[[dict], None]:
    """``on_epoch`` of :func:`icetide.fit.run_fit` passing a plain line to ``emit`` every ``every_epochs``
    epochs or ``every_s`` seconds and at the last epoch: epoch, losses, elapsed time and the time left (the
    time budget's, or at the current rate the epoch limit's; early stopping usually ends sooner)."""
    last = {"t": -math.inf, "epoch": 0}

    def on_epoch(info: dict) -> None:
        now = clock()
        epoch = info["epoch"]
        if epoch - last["epoch"] < every_epochs and now - last["t"] < every_s and epoch < total_epochs:
            return
        last.update(t=now, epoch=epoch)
        elapsed = info["elapsed_s"]
        left = (total_epochs - epoch) * elapsed / max(epoch, 1)
        if max_minutes is not None:
            left = min(left, max(0.0, 60 * max_minutes - elapsed))
        val = info["val_loss"]
        emit(
            f"epoch {epoch}/{total_epochs}{' (binned)' if info.get('binned') else ''}  "
            f"loss {info['train_loss']:.4f}  val {'-' if math.isnan(val) else f'{val:.4f}'}  "
            f"elapsed {elapsed:.0f} s  at most {left:.0f} s left"
        )

    return on_epoch
