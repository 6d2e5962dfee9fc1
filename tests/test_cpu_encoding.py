"""The fused Numba kernels of the hash encoding (CPU) against the PyTorch path: the work split over threads,
unusual inputs, and the kernel choice. Values and gradients on ordinary inputs are in ``test_volume.py``."""

import subprocess
import sys

import pytest
import torch

from icetide.config import ReconstructConfig
from icetide.errors import IcetideError
from icetide.volume import HashEncoding, cpu_encoding

pytestmark = pytest.mark.skipif(cpu_encoding.numba is None, reason="Numba is not installed")

# Dense and hashed levels in a small box.
SMALL = dict(n_levels=4, log2_table_size=10, base_resolution=4.0, per_level_scale=2.0, box_shape_zyx=(8, 16, 16))


def _pair(**overrides) -> tuple[HashEncoding, HashEncoding]:
    """The same float64 encoding (O(1) table values) with the Numba kernels and with the PyTorch path."""
    torch.manual_seed(0)
    fast = HashEncoding(**{**SMALL, **overrides}, kernel="numba").double()
    with torch.no_grad():
        fast.table.normal_()
    slow = HashEncoding(**{**SMALL, **overrides}, kernel="torch").double()
    slow.load_state_dict(fast.state_dict())
    return fast, slow


def _values_and_gradients(enc: HashEncoding, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    out = enc(x)
    return [out, *torch.autograd.grad(out, [x, enc.table], grad)]


@pytest.mark.parametrize("threads", [1, 3, 8])
@pytest.mark.parametrize("n_levels", [1, 4])
def test_every_split_over_threads_gives_the_pytorch_path(threads, n_levels):
    """1 thread runs inline; 3 and 8 threads split points (forward, positions) and, with fewer levels than
    threads, a level's table gradient over scratch copies of its rows."""
    fast, slow = _pair(n_levels=n_levels)
    torch.manual_seed(1)
    x = torch.rand(1001, 3, dtype=torch.float64) * 1.2 - 0.1
    grad = torch.randn(1001, fast.output_dim, dtype=torch.float64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = _values_and_gradients(fast, x, grad)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(got, _values_and_gradients(slow, x, grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("n_points", [1, 7, 8, 9, 1001])
@pytest.mark.parametrize("ahead", [True, False])
def test_rows_requested_ahead_give_the_pytorch_path(monkeypatch, n_points, ahead):
    """The kernels stage each point's cell ``_AHEAD`` points before its turn: fewer points than that, exactly that
    many, one more and many. The table gradient is added that way in the levels larger than ``_PREFETCH_BYTES``:
    here every level or none."""
    assert cpu_encoding._AHEAD == 8
    monkeypatch.setattr(cpu_encoding, "_PREFETCH_BYTES", 0 if ahead else 1 << 62)
    fast, slow = _pair()
    torch.manual_seed(3)
    x = torch.rand(n_points, 3, dtype=torch.float64) * 1.2 - 0.1
    grad = torch.randn(n_points, fast.output_dim, dtype=torch.float64)
    for a, b in zip(_values_and_gradients(fast, x, grad), _values_and_gradients(slow, x, grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_float32_tables_agree_with_the_pytorch_path():
    fast, slow = _pair(n_features=2)
    fast.float(), slow.float()
    torch.manual_seed(2)
    x = torch.rand(500, 3)
    grad = torch.randn(500, fast.output_dim)
    got, expected = _values_and_gradients(fast, x, grad), _values_and_gradients(slow, x, grad)
    assert all(g.dtype == torch.float32 for g in got)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_non_finite_coordinates_never_index_outside_the_table():
    """NaN reads as 0 (as in the Triton kernels), infinities clamp to the faces; no gradient reaches them."""
    fast, _ = _pair()
    x = torch.tensor([[float("nan"), 0.5, 0.5], [float("inf"), 0.5, 0.5], [-float("inf"), 0.5, 0.5]],
                     dtype=torch.float64, requires_grad=True)
    out = fast(x)
    faces = torch.tensor([[0.0, 0.5, 0.5], [1.0, 0.5, 0.5], [0.0, 0.5, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(out, fast(faces), rtol=0, atol=0)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert (grad[:, 0] == 0).all()


def test_kernel_choice():
    assert HashEncoding(**SMALL).kernel_for(torch.device("cpu")) in ("numba", "triton")  # triton: interpreter
    assert HashEncoding(**SMALL, kernel="torch").kernel_for(torch.device("cpu")) == "torch"
    assert HashEncoding(**SMALL, n_features=3, kernel="numba").kernel_for(torch.device("cpu")) == "numba"
    with pytest.raises(RuntimeError, match="the Numba kernels cannot run here"):
        HashEncoding(**SMALL, kernel="numba").kernel_for(torch.device("cuda"))
    half = HashEncoding(**SMALL).to(torch.bfloat16)  # the kernels read float32 or float64 tables
    assert half.kernel_for(torch.device("cpu")) in ("torch", "triton")
    assert half(torch.rand(7, 3)).dtype == torch.bfloat16


def test_a_fit_asking_for_the_numba_kernel():
    from icetide.data import TiltSeries
    from icetide.fit import Fitter

    series = TiltSeries(torch.rand(3, 16, 16).numpy(), [-30.0, 0.0, 30.0], 10.0)
    fitter = Fitter(series, ReconstructConfig(thickness=8, fit={"device": "cpu", "kernel": "numba"}))
    assert fitter.volume.encoding.kernel_for(fitter.device) == "numba"
    if torch.cuda.is_available():
        with pytest.raises(IcetideError, match="fit.kernel: the Numba kernels cannot run here"):
            Fitter(series, ReconstructConfig(thickness=8, fit={"device": "cuda", "kernel": "numba"}))


def test_kernels_still_compile_where_numba_cannot_cache(tmp_path):
    """Numba refuses ``cache=True`` when it finds no writable directory (a read-only install and home); the
    kernels are then compiled without a disk cache. Run in a fresh interpreter, Numba patched to refuse."""
    code = (
        "import numba\n"
        "real = numba.njit\n"
        "def refusing(*args, **kwargs):\n"
        "    if kwargs.get('cache'):\n"
        "        raise RuntimeError('cannot cache function: no locator available')\n"
        "    return real(*args, **kwargs)\n"
        "numba.njit = refusing\n"
        "import torch\n"
        "from icetide.volume import HashEncoding\n"
        "x = torch.rand(5, 3, requires_grad=True)\n"
        "HashEncoding(box_shape_zyx=(4, 8, 8), kernel='numba')(x).sum().backward()\n"
        "print(x.grad.abs().sum().item() > 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
