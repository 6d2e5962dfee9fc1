"""The command line shared by the tools that generate a reference page under docs/."""

from __future__ import annotations

import sys
from pathlib import Path


def write_or_check(out: Path, text: str, argv: list[str], tool: str) -> int:
    """Write ``text`` to ``out``; with ``--stdout`` print it instead; with ``--check`` exit status 1 (and say so)
    when ``out`` is not ``text``. ``tool``: the script's path as the user runs it. Returns the exit status."""
    root = Path(__file__).resolve().parents[1]
    if "--stdout" in argv:
        sys.stdout.write(text)
    elif "--check" in argv:
        if not out.is_file() or out.read_text() != text:
            print(f"{out.relative_to(root)} is stale: run python {tool}", file=sys.stderr)
            return 1
    else:
        out.write_text(text)
        print(f"wrote {out.relative_to(root)} ({len(text.encode())} bytes)")
    return 0
