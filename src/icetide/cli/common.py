"""What every command shares: one-line errors, output folders, progress."""

from __future__ import annotations

import contextlib
import functools
import shutil
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import typer
from rich.console import Console

from ..errors import IcetideError

console = Console(stderr=True)
F = TypeVar("F", bound=Callable)


def fail(message: str) -> None:
    """Print ``error: message`` on one line to stderr and exit with status 2."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
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


def check_output_dir(path: Path, force: bool) -> Path:
    """Refuse an existing file or a non-empty folder at ``path`` unless ``force``; creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise IcetideError(f"{path}: exists and is not a folder")
    if path.exists() and any(path.iterdir()) and not force:
        raise IcetideError(f"{path}: output folder is not empty (use --force to overwrite)")
    return path


@contextlib.contextmanager
def output_dir(path: Path, force: bool) -> Iterator[Path]:
    """Create the output folder for a command; on failure remove what this command created.

    Validate inputs before entering, so that bad input never leaves a folder behind.
    """
    path = check_output_dir(path, force)
    created = not path.exists()
    if path.exists() and force:
        for child in path.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise
