"""What every command group prints with: one console for data, one for diagnostics, ``--json``.

Data goes to stdout (``console``), everything else to stderr (``err``), so ``--json`` output
stays parseable. Nothing printed here is read as rich markup: names, error messages and
patterns such as ``^[a-z][a-z0-9_]{0,63}$`` come out exactly as they are. Styles are given
apart from the text, as ``(text, style)`` pairs, and table cells are plain
:class:`~rich.text.Text`. Error lines are never wrapped, so a script can grep them.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["JsonOpt", "Part", "add_row", "complain", "console", "emit", "err", "fail", "line"]

#: Data: tables, lines and JSON for scripts.
console = Console()
#: Diagnostics: errors, notes, progress.
err = Console(stderr=True)

#: The ``--json`` option every command that prints data has.
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]

#: A piece of a printed line: plain text, or ``(text, style)``; never markup.
Part = str | tuple[str, str] | Text


def line(*parts: Part) -> Text:
    """``parts`` as one piece of text, each taken literally, styles applied from outside."""
    return Text.assemble(*parts)


def emit(data: Any) -> None:
    """``data`` as JSON on stdout (dates and other values as their ``str``)."""
    console.print_json(json.dumps(data, default=str))


def complain(*parts: Part) -> None:
    """One line on stderr, verbatim and unwrapped."""
    err.print(line(*parts), soft_wrap=True)


def fail(code: str, message: str, *, exit_code: int = 1) -> typer.Exit:
    """Print ``code: message`` on stderr (the code in red); the exit to raise after it."""
    complain((code, "red"), ": ", message)
    return typer.Exit(exit_code)


def add_row(table: Table, *cells: str | Text) -> None:
    """Add a row whose plain-string cells are shown as they are, not read as markup."""
    table.add_row(*(cell if isinstance(cell, Text) else Text(cell) for cell in cells))
