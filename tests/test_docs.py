"""The docs follow the code: docs/CLI.md and docs/CONFIGURATION.md are exactly what tools/cli_reference.py and
tools/config_reference.py write, they cover every option and setting, every icetide command the front-page
docs show uses options the command has, and the docs and the code refer only to documents in the repository."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import typer

from icetide.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CLI_MD = ROOT / "docs" / "CLI.md"
CONFIG_MD = ROOT / "docs" / "CONFIGURATION.md"
TROUBLESHOOTING_MD = ROOT / "docs" / "TROUBLESHOOTING.md"
# The documents whose commands are checked here (the others record measurements with their own scripts).
FRONT = [README, CLI_MD, CONFIG_MD, TROUBLESHOOTING_MD]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _commands():
    group = typer.main.get_command(app)
    return [(name, sub, sub.context_class(sub, info_name=name)) for name, sub in group.commands.items()]


def _options(command, ctx) -> set[str]:
    params = command.get_params(ctx)
    return {o for p in params if p.param_type_name == "option" for o in [*p.opts, *p.secondary_opts]}


def test_cli_reference_is_current():
    assert CLI_MD.read_text() == _tool("cli_reference").render(), (
        "docs/CLI.md is stale: run python tools/cli_reference.py"
    )


@pytest.mark.parametrize("name, command, ctx", _commands(), ids=lambda x: x if isinstance(x, str) else "")
def test_cli_reference_documents_every_option(name, command, ctx):
    text = CLI_MD.read_text()
    assert f"### `icetide {name}`" in text
    section = text.split(f"### `icetide {name}`", 1)[1].split("\n### ", 1)[0]
    for param in command.get_params(ctx):
        if param.param_type_name == "option" and param.name != "help":
            assert f"`{param.opts[0]}`" in section, f"{name}: {param.opts[0]} is not in docs/CLI.md"


def test_configuration_reference_is_current():
    assert CONFIG_MD.read_text() == _tool("config_reference").render(), (
        "docs/CONFIGURATION.md is stale: run python tools/config_reference.py"
    )


def test_configuration_reference_describes_every_key():
    tool = _tool("config_reference")
    rows = {line.split("|")[1].strip(" `"): line for line in CONFIG_MD.read_text().splitlines()
            if line.startswith("| `")}
    keys = tool.schema_keys()
    assert len(keys) > 50
    for key in keys:
        assert key in rows, f"{key} is not in docs/CONFIGURATION.md"
        description = rows[key].rstrip(" |").rsplit(" | ", 1)[1]
        assert len(description) > 3, f"{key} has no description (give the schema field one)"


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def _icetide_invocations(block: str):
    """``(command, arguments)`` of every ``icetide COMMAND ...`` (also ``-m icetide``) in a bash block."""
    names = {name for name, _, _ in _commands()}
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        tokens = list(lexer)
        for i, token in enumerate(tokens[:-1]):
            if token == "icetide" and tokens[i + 1] in names:
                args = []
                for arg in tokens[i + 2:]:
                    if arg in ("&&", "||", ";", "|", ">", "<"):
                        break
                    args.append(arg)
                yield tokens[i + 1], args


def test_doc_commands_use_existing_options():
    commands = {name: (command, ctx) for name, command, ctx in _commands()}
    seen = 0
    for doc in FRONT:
        for block in _bash_blocks(doc.read_text()):
            for name, args in _icetide_invocations(block):
                seen += 1
                known = _options(*commands[name])
                for arg in args:
                    if arg.startswith("-") and not re.match(r"-\d", arg):
                        assert arg.split("=")[0] in known, f"{doc.name}: icetide {name} has no option {arg}"
    assert seen > 20


def test_readme_setup_is_what_ci_runs():
    readme, ci = README.read_text(), (ROOT / ".ci" / "run").read_text()
    # CI installs the README's way, with the CPU build of PyTorch pinned in front.
    assert 'pip install -e ".[test]" && icetide demo' in readme
    assert "\npython -m pytest " in readme
    assert 'pip install -q "torch==2.13.0" -e ".[test]"' in ci
    assert "\npython -m pytest\n" in ci


def test_front_page_is_short_and_self_contained():
    assert len(README.read_bytes()) < 12 * 1024  # the goal is 8 KB: detail belongs in docs/
    for doc in FRONT:
        text = doc.read_text()
        for internal in ("DESIGN.md", "../shared", "shared/data"):
            assert internal not in text, f"{doc.name} refers to {internal}"


# A design document that is not part of the repository; the code and the docs cite docs/ instead.
OUTSIDE_DOCUMENT = "DESIGN.md"
# Where a reference to it could be written (and README.md).
REFERRING_TREES = ("src", "tests", "tools", "benchmarks", "docs")
# A markdown link or image: ](target), the target up to a space or the closing parenthesis.
LINK = re.compile(r"\]\(([^)\s]+)")


def _repository_files():
    """README.md and every file under :data:`REFERRING_TREES` but this one, compiled Python and package metadata."""
    here = Path(__file__).resolve()
    yield README
    for tree in REFERRING_TREES:
        for path in sorted((ROOT / tree).rglob("*")):
            parts = path.relative_to(ROOT).parts
            generated = any(part == "__pycache__" or part.endswith(".egg-info") for part in parts)
            if path.is_file() and not generated and path.resolve() != here:
                yield path


def test_no_reference_to_a_document_outside_the_repository():
    files = list(_repository_files())
    assert len(files) > 100
    citing = [str(p.relative_to(ROOT)) for p in files if OUTSIDE_DOCUMENT.encode() in p.read_bytes()]
    assert not citing, f"{OUTSIDE_DOCUMENT} is not in the repository; cite docs/ instead in: {', '.join(citing)}"


def test_relative_links_point_at_files_in_the_repository():
    checked = 0
    for doc in [README, *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in LINK.findall(doc.read_text()):
            if target.startswith("#") or re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target):
                continue  # an anchor in the same page, or a URL (https:, mailto:)
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            where = f"{doc.relative_to(ROOT)}: ]({target})"
            assert path.is_relative_to(ROOT), f"{where} points outside the repository"
            assert path.exists(), f"{where} points at nothing"
            checked += 1
    assert checked > 30
