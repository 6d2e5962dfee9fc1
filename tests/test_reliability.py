"""The fit survives non-finite steps (rollback, halved learning rates) and a killed or terminated process."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from icetide import TiltSeries
from icetide.config import ReconstructConfig
from icetide.errors import IcetideError
from icetide.fit import Fitter, run_fit
from icetide.fit.numerics import finite_or_zeroed
from icetide.io import write_mrc, write_tlt
from icetide.simulate import crowded_phantom, simulate_tilt_series

SHAPE = (12, 24, 32)
ANGLES = np.arange(-45.0, 46.0, 15.0)  # 7 tilts: two steps per epoch at 4 tilts per step


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These problems are tiny: one thread is as fast alone, and ~30x faster than two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def series():
    sim = simulate_tilt_series(crowded_phantom(SHAPE, seed=1), ANGLES, snr_db=20, seed=0, samples_per_voxel=1.0)
    return TiltSeries(sim.noisy, ANGLES)


def _config(**fit) -> ReconstructConfig:
    return ReconstructConfig.model_validate({
        "thickness": SHAPE[0],
        "volume": {"log2_table_size": 10, "n_levels": 3, "hidden": 8},
        "deform": {"local": False},
        "fit": {"tilts_per_step": 4, "warmup_epochs": 1, "lr_decay_every": 100, "patience": 100, "device": "cpu",
                "binned_epochs": 0, **fit},
    })


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, math.nan)


def _break_training_calls(fitter: Fitter, bad, kind: str = "loss") -> None:
    """Make the renderer's training calls (0-based count) for which ``bad(call)`` holds non-finite."""
    render = fitter.scales[0].renderer.render
    calls = iter(range(10**9))

    def broken(*args, **kwargs):
        values, valid = render(*args, **kwargs)
        if kwargs.get("jitter") and bad(next(calls)):
            values = values + math.nan if kind == "loss" else _NanGradient.apply(values)
        return values, valid

    fitter.scales[0].renderer.render = broken


def _state(fitter: Fitter) -> list[torch.Tensor]:
    opt = fitter.optimisers.volume.state_dict()["state"]
    moments = [s[k].clone() for s in opt.values() for k in ("exp_avg", "exp_avg_sq")]
    return [p.detach().clone() for p in _parameters(fitter)] + moments


def _parameters(fitter: Fitter) -> list[torch.Tensor]:
    return [*fitter.volume.parameters(), fitter.deformations.shifts, fitter.deformations.angles]


def test_a_failed_step_rolls_the_epoch_back(series):
    fitter = Fitter(series, _config())
    fitter.train_epoch()
    good = _state(fitter)
    _break_training_calls(fitter, lambda call: call == 1)  # the second step of epoch 2
    fitter.train_epoch()
    # the first step of epoch 2 was taken, then undone with the failed second one at the epoch's end
    for a, b in zip(good, _state(fitter)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert fitter.rollbacks == [{"epoch": 2, "step": 4, "reason": "non-finite loss", "lr_factor": 0.5}]


def test_a_non_finite_step_takes_no_gradient(series):
    """The step's gradients are zeroed on the device, so the optimiser keeps the parameters finite until the
    epoch's end rolls the epoch back."""
    fitter = Fitter(series, _config())
    _break_training_calls(fitter, lambda call: True, "gradients")
    loss, _ = fitter.step_gradients(fitter.scale, torch.arange(4))
    assert finite_or_zeroed(loss, fitter.parameters()).tolist() == [True, False]
    grads = [p.grad for p in fitter.parameters() if p.grad is not None]
    assert grads and all((g == 0).all() for g in grads)


@pytest.mark.parametrize("kind, reason", [("loss", "non-finite loss"), ("gradients", "non-finite gradients")])
def test_the_fit_recovers_from_one_failed_step(series, kind, reason):
    config = _config(epochs=5)
    fitter = Fitter(series, config)
    _break_training_calls(fitter, lambda call: call == 4, kind)  # the first step of epoch 3
    result = run_fit(fitter)
    report = result.report
    assert report["stop_reason"] == "epochs" and report["epochs"] == 5
    assert report["rollbacks"] == [{"epoch": 3, "step": 5, "reason": reason, "lr_factor": 0.5}]
    fit = config.fit
    lrs = [g["lr"] for g in fitter.optimisers.volume.param_groups + fitter.optimisers.deform.param_groups]
    assert lrs == pytest.approx([0.5 * fit.lr_volume, 0.5 * fit.lr_shift_px, 0.5 * math.radians(fit.lr_rotation_deg)])
    assert all(torch.isfinite(p).all() for p in _parameters(fitter))
    assert np.isfinite(report["curves"]["train_loss"]).all()


def test_repeated_failures_end_the_fit_with_the_best_state(series):
    fitter = Fitter(series, _config(epochs=20, max_rollbacks=2))
    _break_training_calls(fitter, lambda call: call >= 4)  # every step from epoch 3 on
    result = run_fit(fitter)
    report = result.report
    # epochs 3 and 4 are rolled back (their first steps 5 and 7 failed), the failure in epoch 5 ends the fit
    assert report["stop_reason"] == "numerical failure: non-finite loss at epoch 5, step 9 after 2 rollbacks"
    assert [r["step"] for r in report["rollbacks"]] == [5, 7] and fitter.lr_factor == 0.25
    assert report["epochs"] == 4 and report["best_epoch"] in (1, 2)
    assert all(torch.isfinite(p).all() for p in _parameters(fitter))
    assert np.isfinite(result.deformations.shifts_px).all()


def test_failures_from_the_first_step_raise(series):
    fitter = Fitter(series, _config(epochs=5, max_rollbacks=3))
    _break_training_calls(fitter, lambda call: True)
    with pytest.raises(IcetideError, match="never took a finite step .*after 3 rollbacks"):
        run_fit(fitter)


def test_rollbacks_resume_exactly(series, tmp_path):
    straight = Fitter(series, _config(epochs=5))
    _break_training_calls(straight, lambda call: call == 2)
    run_fit(straight)
    first = Fitter(series, _config(epochs=3))
    _break_training_calls(first, lambda call: call == 2)
    run_fit(first, checkpoint_path=tmp_path / "checkpoint.pt")
    resumed = Fitter(series, _config(epochs=5))
    resumed.load_checkpoint(tmp_path / "checkpoint.pt")
    assert resumed.lr_factor == 0.5 and resumed.rollbacks == straight.rollbacks and len(straight.rollbacks) == 1
    run_fit(resumed)
    for a, b in zip(_state(straight), _state(resumed)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------- the command in a real process
EPOCHS = 100  # about 2.5 s of fitting on one CPU thread


@pytest.fixture(scope="module")
def cli_files(series, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    write_mrc(folder / "ts.mrc", series.images, voxel_size_A=8.0, stack=True)
    write_tlt(folder / "ts.tlt", ANGLES)
    (folder / "run.yaml").write_text(
        "volume: {log2_table_size: 10, n_levels: 3, hidden: 8}\n"
        f"fit: {{tilts_per_step: 4, epochs: {EPOCHS}, patience: 1000, checkpoint_minutes: 0.002, device: cpu}}\n"
    )
    return folder


def _start(files, out, *extra) -> subprocess.Popen:
    command = [sys.executable, "-c", "from icetide.cli.main import main; main()", "reconstruct",
               str(files / "ts.mrc"), "--angles", str(files / "ts.tlt"), "-o", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(out.parent / f"{out.name}.log", "a") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


def _wait_for_checkpoint(proc: subprocess.Popen, out, timeout_s: float = 60) -> None:
    end = time.monotonic() + timeout_s
    while not (out / "checkpoint.pt").is_file():
        assert proc.poll() is None, (out.parent / f"{out.name}.log").read_text()
        assert time.monotonic() < end, "no checkpoint written"
        time.sleep(0.05)


def _checkpoint_epoch(out) -> int:
    return torch.load(out / "checkpoint.pt", weights_only=False)["epoch"]


def test_sigkill_then_resume_finishes_the_run(cli_files, tmp_path):
    out = tmp_path / "rec"
    proc = _start(cli_files, out, "--config", str(cli_files / "run.yaml"))
    _wait_for_checkpoint(proc, out)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    reached = _checkpoint_epoch(out)
    assert 0 < reached < EPOCHS and not (out / "report.json").exists()
    saved = torch.load(out / "checkpoint.pt", weights_only=False)["curves"]["train_loss"]

    resumed = _start(cli_files, out, "--resume")
    assert resumed.wait(timeout=60) == 0, (tmp_path / "rec.log").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["epochs"] == EPOCHS and report["stop_reason"] == "epochs"
    assert report["curves"]["train_loss"][: len(saved)] == saved  # continued from the checkpoint
    assert (out / "tomogram.mrc").is_file()


def test_sigterm_saves_a_checkpoint_and_writes_the_outputs(cli_files, tmp_path):
    out = tmp_path / "rec"
    proc = _start(cli_files, out, "--config", str(cli_files / "run.yaml"))
    _wait_for_checkpoint(proc, out)
    proc.send_signal(signal.SIGTERM)
    # The fit stops at the end of the epoch, saves the checkpoint and writes every output as a normal run.
    assert proc.wait(timeout=30) == 0, (tmp_path / "rec.log").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["stop_reason"] == f"interrupted by signal {int(signal.SIGTERM)}"
    assert 0 < report["epochs"] < EPOCHS and _checkpoint_epoch(out) == report["epochs"]
    assert (out / "tomogram.mrc").is_file() and (out / "deformations.json").is_file()
