"""argparse types shared by the ``aloe`` subcommands: a bad number is refused by the parser, in one line, before
any work starts."""

from __future__ import annotations

import argparse
import math


def _number(text: str, kind: type, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    n = _number(text, int, "an integer")
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not positive")
    return n


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    n = _number(text, int, "an integer")
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is negative")
    return n


def positive_float(text: str) -> float:
    """A finite number > 0."""
    x = _number(text, float, "a number")
    if not x > 0:
        raise argparse.ArgumentTypeError(f"{text} is not positive")
    return x


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    x = _number(text, float, "a number")
    if x < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return x


def port_number(text: str) -> int:
    """A TCP port, 1-65535."""
    port = _number(text, int, "a port number")
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 1-65535")
    return port
