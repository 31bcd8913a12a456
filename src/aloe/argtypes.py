"""argparse types shared by the ``aloe`` subcommands: a bad number is refused by the parser, in one line, before
any work starts."""

from __future__ import annotations

import argparse
import math


def _number(text: str, kind: type, low: float, strict: bool, high: float = math.inf):
    """``text`` as ``kind`` (int or a finite float), at least ``low`` (above it if ``strict``), at most ``high``."""
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    if value > high or value < low or (strict and value == low):
        if high < math.inf:
            raise argparse.ArgumentTypeError(f"{text} is outside {low:g}-{high:g}")
        raise argparse.ArgumentTypeError(f"{text} is not positive" if strict and low == 0 else
                                         f"{text} is negative" if low == 0 else f"{text} is below {low:g}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _number(text, int, 0, True)


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    return _number(text, int, 0, False)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _number(text, float, 0.0, True)


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    return _number(text, float, 0.0, False)


def port_number(text: str) -> int:
    """A TCP port, 1-65535."""
    try:
        return _number(text, int, 1, False, 65535)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(str(exc).replace("is not an integer", "is not a port number")
                                         .replace(f"{text} is outside", f"port {text} is outside")) from None
