"""The command line: click commands (`commands`) and the terminal's live progress (`progress`)."""

from dlsearch.cli.commands import main

__all__ = ["main"]
