"""Entry point: ``icetide COMMAND ...``."""

from __future__ import annotations

import typer

from .. import __version__

app = typer.Typer(
    name="icetide",
    help=(
        "Joint alignment and reconstruction of cryo-electron tomography tilt series (ICE-TIDE): "
        "simulate tilt series with known truth, reconstruct with an implicit neural volume while "
        "estimating per-tilt deformations, compare with FBP/SIRT and score against the truth."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"icetide {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    pass


def _register() -> None:
    from . import batch_cmd, demo_cmd, evaluate_cmd, experiment_cmd, fbp_cmd, reconstruct_cmd, simulate_cmd

    app.command("demo")(demo_cmd.demo)
    app.command("simulate")(simulate_cmd.simulate)
    app.command("reconstruct")(reconstruct_cmd.reconstruct)
    app.command("fbp")(fbp_cmd.fbp)
    app.command("evaluate")(evaluate_cmd.evaluate)
    app.command("experiment")(experiment_cmd.experiment)
    app.command("batch")(batch_cmd.batch)


_register()


def main() -> None:
    app()
