"""Write tests/golden/fit.pt and tests/golden/fit.json: the learned tensors and the reports of the short fits of
tests/fit_golden_cases.py, which tests/test_fit_golden.py compares exactly.

Run it only when a change of the fit's numbers is intended (and say so in the commit):

    PYTHONPATH=src python tools/make_fit_golden.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

from fit_golden_cases import CASES, golden_versions, run_case  # noqa: E402


def main() -> None:
    tensors, reports = {}, {}
    for name in CASES:
        tensors[name], reports[name] = run_case(name)
    out = TESTS / "golden"
    out.mkdir(exist_ok=True)
    torch.save(tensors, out / "fit.pt")
    (out / "fit.json").write_text(json.dumps(reports, indent=1, sort_keys=True) + "\n")
    (out / "versions.json").write_text(json.dumps(golden_versions(), indent=1) + "\n")
    print(f"wrote {out / 'fit.pt'}, {out / 'fit.json'} and {out / 'versions.json'}")


if __name__ == "__main__":
    main()
