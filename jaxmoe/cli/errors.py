"""The CLI's user-error type, in a module of its own so that subcommands need not import the CLI package."""
from __future__ import annotations


class CliError(Exception):
    """A user error the CLI prints as one line and exits 2 on."""
