"""Wall-clock timing shared by the benchmark scripts (run as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import time
from typing import Callable

import torch


def best_times(steps: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, float]:
    """Best wall time (s) of each step over ``repeats`` interleaved runs, after one warm-up run each."""

    def run(step: Callable[[], None]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    for step in steps.values():
        run(step)
    best = {name: float("inf") for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            best[name] = min(best[name], run(step))
    return best


def best_time(step: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Best wall time (s) of ``step`` over ``repeats`` runs after one warm-up run."""
    return best_times({"step": step}, repeats, device)["step"]
