"""What every experiment writes besides its figures: ``results.json`` and ``summary.md``."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from ..io import atomic_path, write_json

__all__ = ["cc_table", "fmt", "markdown_table", "write_report"]


def fmt(value, digits: int = 3) -> str:
    """A number for a table: ``digits`` decimals, ``-`` for None."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub-flavoured markdown table; cells are formatted with :func:`fmt`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def cc_table(case: dict) -> str:
    """The scores of one :func:`icetide.experiments.case.run_case` result: CC, FSC 0.5 / 0.143 (Angstrom)."""
    rows = []
    for name, r in case["reconstructions"].items():
        res = r["fsc"]["resolution"]
        rows.append((name, r["cc"], res["0.5"].get("angstrom"), res["0.143"].get("angstrom")))
    return markdown_table(("method", "CC", "FSC 0.5 (Å)", "FSC 0.143 (Å)"), rows)


def write_report(out_dir: Path, name: str, settings, machine: dict, results: dict, body: str) -> dict:
    """Write ``results.json`` (settings, machine, results) and ``summary.md`` (title, command, machine, body)."""
    out_dir = Path(out_dir)
    data = {"experiment": name, "settings": asdict(settings), "machine": machine, **results}
    write_json(out_dir / "results.json", data)
    where = machine["gpu"] or f"CPU, {machine['torch_threads']} threads"
    text = (
        f"# icetide experiment {name}\n\n"
        + (f"Command: `{settings.command}`\n\n" if settings.command else "")
        + f"Machine: {where}; {machine['platform']}; torch {machine['torch']}; icetide {machine['icetide']}.\n\n"
        + body.strip()
        + "\n"
    )
    with atomic_path(out_dir / "summary.md") as tmp:
        tmp.write_text(text)
    return data
