"""A lean start: the CLI and its help never import the optional or heavy packages (Dask, matplotlib)."""

import json
import subprocess
import sys

# In a fresh interpreter: this test process has imported them already through other tests.
SCRIPT = """
import json, sys
import typer
from typer.testing import CliRunner
from icetide.cli.main import app

runner = CliRunner()
commands = list(typer.main.get_command(app).commands)
for args in (["--help"], ["--version"], *([name, "--help"] for name in commands)):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (args, result.output)
print(json.dumps(sorted(m for m in ("dask", "distributed", "matplotlib") if m in sys.modules)))
"""


def test_cli_and_its_help_import_neither_dask_nor_matplotlib():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
