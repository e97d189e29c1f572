"""The argument parser every maskpro command uses: one-line usage errors, every default shown once."""

from __future__ import annotations

import argparse
import copy

from .errors import EXIT_BAD_INPUT


class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps epilogs as written and appends ``(default: X)`` unless the help already states a default or the
    option takes no value."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or _no_value(action.default) or not action.option_strings:
            return text
        return super()._get_help_string(action)

    def _format_action(self, action):
        if not action.help and action.option_strings and not _no_value(action.default):
            action = copy.copy(action)  # an option without help text still shows its default
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def _no_value(default) -> bool:
    """Defaults not worth showing: none, a flag's False, suppressed (by identity: 0 is a value, not False)."""
    return default is None or default is False or default is argparse.SUPPRESS


class Parser(argparse.ArgumentParser):
    """``PROG: error: MESSAGE (see PROG --help)`` and exit code 2 on bad arguments; subcommands inherit it."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", Help)
        super().__init__(*args, **kwargs)

    def add_subparsers(self, **kwargs):
        kwargs.setdefault("parser_class", Parser)
        return super().add_subparsers(**kwargs)

    def error(self, message: str):
        command = self.prog.split()[0]  # the one prefix of every error, subcommands included
        self.exit(EXIT_BAD_INPUT, f"{command}: error: {message} (see `{self.prog} --help`)\n")
