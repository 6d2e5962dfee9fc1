"""``icetide.log``: the header, progress, warnings and errors of a run; appended; nothing left behind."""

import logging
import sys
import threading
import warnings

import pytest

from icetide import IcetideError, __version__
from icetide.config import ReconstructConfig
from icetide.runlog import LOG_NAME, changed_settings, epoch_lines, run_log


@pytest.fixture
def argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["icetide", "reconstruct", "my series.mrc", "--epochs", "3"])


def test_changed_settings_are_dotted_keys_with_their_defaults():
    assert changed_settings(ReconstructConfig()) == {}
    config = ReconstructConfig.model_validate({"thickness": 12, "fit": {"epochs": 3}, "deform": {"local_grid": [4, 4]}})
    assert changed_settings(config) == {
        "thickness": (12, None), "fit.epochs": (3, 500), "deform.local_grid": ([4, 4], [10, 10]),
    }


def test_the_log_has_the_header_progress_and_warnings_and_leaves_nothing_behind(tmp_path, argv, monkeypatch):
    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *args: shown.append(str(message)))
    icetide_logger = logging.getLogger("icetide")
    level, show = icetide_logger.level, warnings.showwarning
    config = ReconstructConfig.model_validate({"fit": {"epochs": 3}})
    with run_log(tmp_path, changed_settings(config)) as log:
        on_epoch = epoch_lines(3, None, log.info)
        for epoch in (1, 2, 3):
            on_epoch({"epoch": epoch, "train_loss": 0.5, "val_loss": float("nan"), "elapsed_s": 1.0 * epoch})
        warnings.warn("a cheap warning")
        logging.getLogger("icetide.fit").warning("epoch rolled back")
    text = (tmp_path / LOG_NAME).read_text(encoding="utf-8")
    assert f"icetide {__version__} on " in text and "torch " in text and "numpy " in text
    assert "command: icetide reconstruct 'my series.mrc' --epochs 3" in text
    assert "fit.epochs: 3 (default: 500)" in text
    assert "epoch 1/3  loss 0.5000  val -" in text and "epoch 3/3" in text
    assert "warning: a cheap warning (UserWarning, test_runlog.py:" in text and shown == ["a cheap warning"]
    assert "warning: epoch rolled back" in text
    assert text.splitlines()[0][:4].isdigit() and text.splitlines()[0][19] == "Z"  # ISO time, UTC
    assert not icetide_logger.handlers and icetide_logger.level == level and warnings.showwarning is show


def test_errors_end_the_log_and_a_second_run_appends(tmp_path, argv):
    with pytest.raises(IcetideError), run_log(tmp_path):
        raise IcetideError("bad input, said in one line")
    with pytest.raises(ZeroDivisionError), run_log(tmp_path):
        1 / 0
    text = (tmp_path / LOG_NAME).read_text()
    assert text.count("command: icetide reconstruct") == 2
    assert "error: bad input, said in one line\n" in text
    assert "error: ZeroDivisionError: division by zero\nTraceback" in text  # unexpected: with the traceback
    assert not logging.getLogger("icetide").handlers


def test_a_nested_log_on_the_same_folder_adds_nothing_and_other_folders_and_threads_stay_apart(tmp_path, argv):
    outer, inner = tmp_path / "outer", tmp_path / "inner"
    outer.mkdir()
    inner.mkdir()
    with run_log(outer) as log:
        with run_log(outer):
            log.info("same folder")
        with run_log(inner):
            log.info("both folders")
        worker = threading.Thread(target=lambda: log.info("another thread"))
        worker.start()
        worker.join()
    outer_text, inner_text = (outer / LOG_NAME).read_text(), (inner / LOG_NAME).read_text()
    # its own header and the inner folder's (the outer log records everything its run does)
    assert outer_text.count("command:") == 2 and "same folder" in outer_text and "both folders" in outer_text
    assert inner_text.count("command:") == 1 and "same folder" not in inner_text and "both folders" in inner_text
    assert "another thread" not in outer_text
    assert not logging.getLogger("icetide").handlers
