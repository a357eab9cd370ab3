"""Where the console scripts print: a terminal gets its width, a pipe or a file whole words.

Rich draws for 80 columns when stdout is not a terminal. For tables that cut every cell wider
than its share to `…` (`replayctl list | grep completed` found `compl…`, `dlqtriage analyze`
showed `OLDER_REVIS…`), and long messages broke over lines, so `grep`, `jq -R` and the eyes of
whoever reads a log saw pieces. Off a terminal these consoles are `PIPE_WIDTH` wide (a
`COLUMNS` in the environment still wins), and every console keeps a message on one line
(`soft_wrap`: the terminal folds it, not rich).

Markup is off: what they print is mostly data (entity ids, JSON paths, error messages, `--as`
names), and a `[/]` in a record made rich raise MarkupError, so `dlqtriage sample` and
`analyze` ended in a traceback. The few styled words are `Text` or `markup=True` with the data
escaped (`styled`).
"""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.markup import escape

PIPE_WIDTH = 240


def console(*, stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    wide = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(
        stderr=stderr,
        width=PIPE_WIDTH if wide else None,
        soft_wrap=True,
        highlight=False,
        markup=False,
    )


def styled(con: Console, markup: str, *data: object) -> None:
    """Print `markup` (rich markup, `{}` placeholders) with each datum escaped into it."""
    con.print(markup.format(*(escape(str(d)) for d in data)), markup=True)
