"""Printing and error handling shared by the tasks: errors become one clear
message and an exit code (2 for bad input), never a traceback."""

from __future__ import annotations

import functools
import json
import sys

from rich.console import Console
from rich.table import Table
from rich.text import Text

from orchestrator.common.errors import OrchestratorError

console = Console(highlight=False, soft_wrap=True, emoji=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


def friendly(fn):
    """Wrap a task so OrchestratorError exits with its code and message only."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from invoke.exceptions import Exit

        try:
            return fn(*args, **kwargs)
        except OrchestratorError as e:
            # Messages quote build output and paths like "[app 2/3]": never markup.
            err_console.print(Text("error: ", style="bold red") + Text(e.message))
            if e.hint:
                err_console.print(Text("  hint: ", style="dim") + Text(e.hint))
            raise Exit(code=e.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise Exit(code=130) from None

    return wrapper


def table(title: str, columns: list[str], rows: list[list]) -> None:
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[Text(str(x)) for x in r])
    console.print(t)


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def log(msg: str) -> None:
    console.print(msg, markup=False)


def human_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
