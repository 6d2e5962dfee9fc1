"""The fused Triton kernels of the hash encoding against its PyTorch path.

Without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is
imported, hence a subprocess); those tests skip when Triton is not installed (CPU builds of PyTorch ship
without it). The CUDA tests skip without CUDA.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from icetide.config import ReconstructConfig
from icetide.errors import IcetideError
from icetide.config import VolumeSettings
from icetide.volume import HashEncoding, ImplicitVolume, ReferenceHashEncoding
from icetide.volume.triton_encoding import kernel_available, triton

needs_triton = pytest.mark.skipif(triton is None, reason="Triton is not installed")
needs_cuda_kernel = pytest.mark.skipif(
    not (torch.cuda.is_available() and triton is not None), reason="needs CUDA and Triton"
)
TESTS = Path(__file__).resolve().parent

# A box whose encoding has dense and hashed levels.
SMALL = dict(n_levels=4, log2_table_size=10, base_resolution=4.0, per_level_scale=2.0, box_shape_zyx=(8, 16, 16))


def max_errors(device: str, n_features: int, interpolation: str, table_dtype: str, n_points: int, **layout) -> dict:
    """Largest differences between the kernels and the PyTorch path: outputs, table and position gradients,
    with the size of each for scale. Points reach 10 % beyond the box on every side (clamped there)."""
    torch.manual_seed(0)
    args = dict(SMALL if not layout else layout, n_features=n_features, interpolation=interpolation)
    fast = HashEncoding(**args, kernel="triton", table_dtype=getattr(torch, table_dtype)).to(device)
    fast.table.data.uniform_(-1, 1)
    slow = HashEncoding(**args, kernel="torch").to(device)
    slow.load_state_dict(fast.state_dict())
    assert fast.kernel_for(fast.table.device) == "triton" and slow.kernel_for(slow.table.device) == "torch"
    x = (torch.rand(n_points, 3, device=device) * 1.2 - 0.1).requires_grad_()
    x_slow = x.detach().clone().requires_grad_()
    grad = torch.randn(n_points, fast.output_dim, device=device)
    out = fast(x)
    (out * grad).sum().backward()
    out_slow = slow(x_slow)
    (out_slow * grad).sum().backward()
    return {
        "out": (out - out_slow).abs().max().item(), "out_size": out_slow.abs().max().item(),
        "table": (fast.table.grad - slow.table.grad).abs().max().item(),
        "table_size": slow.table.grad.abs().max().item(),
        "xyz": (x.grad - x_slow.grad).abs().max().item(), "xyz_size": x_slow.grad.abs().max().item(),
        "outside_zero": bool((x.grad[(x.detach() < 0) | (x.detach() > 1)] == 0).all()),
    }


def interpreted(**kwargs) -> dict:
    """:func:`max_errors` on CPU tensors under Triton's interpreter, in a fresh interpreter process."""
    code = (f"import json, sys; sys.path.insert(0, {str(TESTS)!r}); from test_triton_encoding import max_errors; "
            f"print(json.dumps(max_errors('cpu', **{kwargs!r})))")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def check(errors: dict, rtol: float) -> None:
    for key in ("out", "table", "xyz"):
        assert errors[key] <= rtol * errors[f"{key}_size"], (key, errors)
    assert errors["outside_zero"]


@needs_triton
@pytest.mark.parametrize("n_features, interpolation", [(2, "linear"), (4, "smoothstep"), (1, "linear")])
def test_interpreted_kernels_equal_the_pytorch_path(n_features, interpolation):
    check(interpreted(n_features=n_features, interpolation=interpolation, table_dtype="float32", n_points=300), 1e-5)


@needs_triton
def test_interpreted_half_precision_table_reads_are_close():
    # fp16 keeps 11 significant bits: the values and gradients agree to about 1e-3 of their size.
    check(interpreted(n_features=2, interpolation="linear", table_dtype="float16", n_points=300), 3e-3)


@needs_triton
@pytest.mark.parametrize("smooth, need_table, need_unit", [(False, True, True), (True, True, False), (False, False, True)])
def test_kernels_compile_for_hopper_without_a_gpu(smooth, need_table, need_unit):
    """The interpreter runs Python, not the compiler: compiling for sm_90 catches what only the compiler rejects."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from icetide.volume import triton_encoding as te

    constants = {"res_ptr": "*fp32", "last_ptr": "*fp32", "mult_ptr": "*i64", "mask_ptr": "*i64",
                 "hashed_ptr": "*i32", "offset_ptr": "*i64", "n_points": "i32", "out_columns": "i32",
                 "F": "constexpr", "BLOCK": "constexpr", "SMOOTH": "constexpr"}
    forward = {"unit_ptr": "*fp32", "table_ptr": "*fp16", "out_ptr": "*fp32", **constants}
    backward = {"unit_ptr": "*fp32", "table_ptr": "*fp32", "grad_out_ptr": "*fp32", "grad_table_ptr": "*fp32",
                "grad_unit_ptr": "*fp32", **constants, "NEED_TABLE": "constexpr", "NEED_UNIT": "constexpr"}
    target = GPUTarget("cuda", 90, 32)
    flags = {"F": 4, "BLOCK": 128, "SMOOTH": smooth}
    triton.compile(ASTSource(te._encode_forward_kernel, forward, constexprs=flags), target=target)
    flags.update(NEED_TABLE=need_table, NEED_UNIT=need_unit)
    compiled = triton.compile(ASTSource(te._encode_backward_kernel, backward, constexprs=flags), target=target)
    assert "atom" in compiled.asm["ptx"] or "red" in compiled.asm["ptx"]


def test_kernel_choice_on_cpu():
    enc = HashEncoding(**SMALL)
    assert enc.kernel_for(torch.device("cpu")) != "triton" or os.environ.get("TRITON_INTERPRET") == "1"
    assert ReferenceHashEncoding(**SMALL).kernel_for(torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="kernel must be"):
        HashEncoding(**SMALL, kernel="fused")
    if not kernel_available(torch.device("cpu")):
        with pytest.raises(RuntimeError, match="cannot run here"):
            HashEncoding(**SMALL, kernel="triton")(torch.rand(4, 3))
    if triton is not None:  # three features are not a power of two: auto falls back to PyTorch
        assert HashEncoding(**{**SMALL, "n_features": 3}).kernel_for(torch.device("cuda")) == "torch"


def test_fit_asking_for_the_kernel_on_cpu_is_a_clear_error():
    from icetide.data import TiltSeries
    from icetide.fit import Fitter

    if kernel_available(torch.device("cpu")):
        pytest.skip("Triton's interpreter is on")
    series = TiltSeries(torch.rand(3, 16, 16).numpy(), [-30.0, 0.0, 30.0], 10.0)
    config = ReconstructConfig(thickness=8, fit={"device": "cpu", "kernel": "triton"})
    with pytest.raises(IcetideError, match="fit.kernel: the Triton kernels cannot run here"):
        Fitter(series, config)


def test_mixed_precision_is_a_no_op_on_cpu():
    volume = ImplicitVolume((8, 16, 16), VolumeSettings(n_levels=3, log2_table_size=10))
    points = torch.rand(50, 3) * 8 - 4
    before = volume(points)
    volume.set_execution("auto", mixed_precision=True)
    assert torch.equal(volume(points), before) and volume(points).dtype == torch.float32


@needs_cuda_kernel
@pytest.mark.parametrize("n_features, interpolation", [(2, "linear"), (4, "smoothstep")])
def test_cuda_kernels_equal_the_pytorch_path(n_features, interpolation):
    check(max_errors("cuda", n_features, interpolation, "float32", 200_000), 1e-5)


@needs_cuda_kernel
def test_cuda_kernels_on_the_paper_layout():
    layout = dict(n_levels=8, log2_table_size=16, base_resolution=8.0, per_level_scale=2.0,
                  box_shape_zyx=(90, 256, 256))
    # The finest level has 1024 cells: a level coordinate near 1000 keeps about 1e-4 of a cell in float32,
    # so the two paths (same formula, different operation order) differ at that level (2.9e-5 measured).
    check(max_errors("cuda", 4, "linear", "float32", 500_000, **layout), 1e-4)


@needs_cuda_kernel
def test_cuda_half_precision_table_reads_are_close():
    check(max_errors("cuda", 2, "linear", "float16", 200_000), 3e-3)


@needs_cuda_kernel
def test_cuda_lattice_and_mixed_precision_volume():
    volume = ImplicitVolume((32, 64, 64), VolumeSettings(log2_table_size=12)).cuda()
    offset = torch.tensor([0.2, -0.1, 0.3], device="cuda")
    fast = volume.lattice(offset)
    volume.set_execution("torch")
    slow = volume.lattice(offset)
    assert (fast - slow).abs().max() <= 1e-5 * slow.abs().max()
    volume.set_execution("auto", mixed_precision=True)
    mixed = volume.lattice(offset)
    assert mixed.dtype == torch.float32
    assert (mixed - slow).abs().max() <= 0.02 * slow.abs().max() + 1e-4


@needs_cuda_kernel
@pytest.mark.parametrize("mixed", [False, True])
def test_cuda_recomputed_lattice_matches_the_kept_one(mixed):
    """Activation checkpointing with the Triton kernels: the same densities and gradients, up to the order of
    the kernels' atomic additions (and, in mixed precision, the bf16 rounding of each piece's MLP gradients)."""
    volume = ImplicitVolume((32, 64, 64), VolumeSettings(log2_table_size=12)).cuda()
    volume.set_execution("auto", mixed_precision=mixed)
    offset = torch.tensor([0.2, -0.1, 0.3], device="cuda")
    weights = torch.randn(32, 40, 64, device="cuda")

    def run(recompute_voxels):
        volume.zero_grad()
        band = volume.lattice(offset, rows=slice(10, 50), recompute_voxels=recompute_voxels)
        (band * weights).sum().backward()
        return [band.detach()] + [p.grad.clone() for p in volume.parameters()]

    tolerance = 1e-2 if mixed else 1e-5
    for kept, recomputed in zip(run(None), run(5 * 32 * 64)):
        assert (kept - recomputed).abs().max() <= tolerance * kept.abs().max() + 1e-7
