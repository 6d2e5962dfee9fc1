"""What every command shares: one-line errors, output folders, progress and warnings (printed and logged)."""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import warnings
from pathlib import Path
from typing import Annotated, Callable, Iterator, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from ..errors import IcetideError
from ..runlog import LOG_NAME

# Options more than one command declares alike.
ForceOption = Annotated[bool, typer.Option("--force", help="Replace the contents of a non-empty output folder.")]


console = Console(stderr=True)
# What a command prints also goes, plain, to the run log open at the time (icetide.runlog).
log = logging.getLogger("icetide.cli")
F = TypeVar("F", bound=Callable)


def say(text: str) -> None:
    """Print ``text`` (rich markup) on one line and add it, plain, to the open run log."""
    console.print(text, highlight=False, soft_wrap=True)
    log.info(Text.from_markup(text).plain)


def warn(message: str) -> None:
    """Print ``warning: message`` on one line and add it to the open run log."""
    console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)
    log.warning(message)


@contextlib.contextmanager
def held_warnings(into: list[str]) -> Iterator[None]:
    """Print the Python warnings raised inside as ``warning:`` lines and keep their messages in ``into``: inputs
    are read before the output folder, and its run log, exist (log them once it is open)."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for warning in caught:
            console.print(f"[yellow]warning:[/] {escape(str(warning.message))}", highlight=False, soft_wrap=True)
            into.append(str(warning.message))


def fail(message: str) -> None:
    """Print ``error: message`` on one line to stderr and exit with status 2."""
    # Escaped: messages quote brackets ("pip install 'icetide[batch]'", "[section]") that rich would take as markup.
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def one_line_errors(func: F) -> F:
    """Turn expected failures (bad input, missing files, out of memory) into one line and exit 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except IcetideError as exc:
            fail(str(exc))
        except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            fail(f"{exc.filename}: {exc.strerror}")
        except MemoryError:
            fail("out of memory; try a smaller size or --max-memory")
        except KeyboardInterrupt:
            console.print("interrupted")
            raise typer.Exit(code=130)

    return wrapper  # type: ignore[return-value]


def check_alignment_options(deformations: Path | None, xf: Path | None, aln: Path | None) -> None:
    """At most one source of an alignment."""
    given = [name for name, value in (("--deformations", deformations), ("--xf", xf), ("--aln", aln)) if value]
    if len(given) > 1:
        raise IcetideError(f"{' and '.join(given)} exclude each other")


def _outputs(path: Path) -> list[Path]:
    """What a folder holds but its run log (which every run into the folder appends to)."""
    return [child for child in path.iterdir() if child.name != LOG_NAME]


def check_output_dir(path: Path, force: bool) -> Path:
    """Refuse an existing file or a folder with outputs at ``path`` unless ``force``; creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise IcetideError(f"{path}: exists and is not a folder")
    if path.exists() and _outputs(path) and not force:
        raise IcetideError(f"{path}: output folder is not empty (use --force to overwrite)")
    return path


@contextlib.contextmanager
def output_dir(path: Path, force: bool) -> Iterator[Path]:
    """Create the output folder for a command (``force``: empty it first); on failure remove what this command
    wrote but its run log (``icetide.log`` says why it failed), and the folder if this command created it and
    either no output had been written yet (bad input found late) or no log is left.

    Validate inputs before entering, so that bad input never leaves a folder behind.
    """
    path = check_output_dir(path, force)
    created = not path.exists()
    if path.exists() and force:
        for child in _outputs(path):
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        written = _outputs(path)
        for child in written:
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        if created and (not written or not any(path.iterdir())):
            shutil.rmtree(path, ignore_errors=True)
        raise
