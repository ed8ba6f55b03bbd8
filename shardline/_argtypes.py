"""Command-line values, checked where they are read, and a parser whose errors are one line.

A bad value on the command line is the user's to fix: it gets one line on stderr naming
the option, the value and what would do, and exit status 2 (argparse's own), before
anything starts. Never a traceback.
"""

from __future__ import annotations

import argparse
import keyword
import sys
from collections.abc import Callable
from typing import NoReturn

__all__ = ["LOG_LEVELS", "Parser", "at_least", "log_level", "module_name",
           "non_negative_float", "port", "positive_float"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line, pointing at ``--help``."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


def at_least(lowest: int) -> Callable[[str], int]:
    """An integer >= ``lowest``."""

    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"{value} is too small: use {lowest} or more")
        return value

    return check


def _number(text: str, zero_ok: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value >= 0 if zero_ok else value > 0) or value == float("inf"):
        raise argparse.ArgumentTypeError(
            f"{text} is not a number {'of 0 or more' if zero_ok else 'above 0'}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (seconds, mostly)."""
    return _number(text, zero_ok=False)


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (a wait that may be none)."""
    return _number(text, zero_ok=True)


def port(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port: use 0 (any free port) "
                                         "to 65535")
    return value


def log_level(text: str) -> str:
    """A ``logging`` level name, any case: returned upper-case."""
    level = text.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"unknown log level {text!r}: use one of {', '.join(LOG_LEVELS).lower()}")
    return level


def module_name(text: str) -> str:
    """A dotted Python module name (``myapp`` or ``myapp.actors``): what an allow-list
    holds. Anything else could never match an import, so it is a typo."""
    parts = text.split(".")
    if not all(p.isidentifier() and not keyword.iskeyword(p) for p in parts):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a module name (dotted Python identifiers, as in "
            "myapp.actors)")
    return text
