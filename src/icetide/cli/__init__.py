"""The ``icetide`` command line (typer); each command lives in its own module."""
