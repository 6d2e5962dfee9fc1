"""Golden test of the fit: short CPU fits (one per renderer, one with the binned stage, one with the CTF forward
model; tests/fit_golden_cases.py) give exactly the stored parameters, curves and report.

A refactoring of the fit must keep these bit for bit (same floating-point operations in the same order, same
random draws). Regenerate tests/golden/ with ``PYTHONPATH=src python tools/make_fit_golden.py`` only when a change
of behaviour is intended. Skipped where torch or numpy is not the build the numbers were made with, or the CPU's
instruction sets differ (tests/golden/versions.json): the libraries pick their kernels by both and may round
differently.
"""

import json
from pathlib import Path

import pytest
import torch

from fit_golden_cases import CASES, golden_versions, run_case

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def golden() -> tuple[dict, dict]:
    made_with = json.loads((GOLDEN / "versions.json").read_text())
    if made_with != golden_versions():
        pytest.skip(f"the golden numbers were made with {made_with}, this is {golden_versions()}")
    return torch.load(GOLDEN / "fit.pt", weights_only=True), json.loads((GOLDEN / "fit.json").read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_the_fit_gives_the_golden_numbers_exactly(golden, case):
    tensors, report = run_case(case)
    expected_tensors, expected_reports = golden[0][case], golden[1][case]
    assert sorted(tensors) == sorted(expected_tensors)
    for key, value in tensors.items():
        expected = expected_tensors[key]
        assert value.dtype == expected.dtype and torch.equal(value, expected), key
    # through JSON, as stored (tuples become lists)
    assert json.loads(json.dumps(report)) == expected_reports
