"""Print the README's command-line reference (markdown) from the typer app, so the docs follow the code.

Usage: ``python tools/cli_reference.py`` and paste the output under "Command-line reference" in README.md;
``tests/test_docs.py`` fails when an option is missing from the README.
"""

import typer

from icetide.cli.main import app


def command_reference(name: str, command) -> list[str]:
    """Markdown lines for one command: summary, usage and a table of its arguments and options."""
    ctx = command.context_class(command, info_name=f"icetide {name}")
    params = command.get_params(ctx)
    arguments = [p for p in params if p.param_type_name == "argument"]
    options = [p for p in params if p.param_type_name == "option" and p.name != "help"]
    summary = (command.help or "").strip().split("\n\n")[0].replace("\n", " ")
    usage = " ".join(["icetide", name, "[OPTIONS]", *(p.name.upper() for p in arguments)])
    lines = [f"### `icetide {name}`", "", summary, "", "```text", usage, "```", "", "| option | meaning |", "| --- | --- |"]
    for p in arguments:
        lines.append(f"| `{p.name.upper()}` | {(getattr(p, 'help', '') or '').strip()} |")
    for p in options:
        text = (p.help or "").replace("\n", " ").replace("|", "\\|")
        if p.default not in (None, False) and not p.is_flag and "Default" not in text:
            text += f" Default: {p.default}."
        lines.append(f"| {', '.join(f'`{o}`' for o in p.opts)} | {text} |")
    return lines + [""]


def main() -> None:
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        print("\n".join(command_reference(name, command)))


if __name__ == "__main__":
    main()
