"""argparse value types shared by every command (a foundation: imports nothing of the package)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type for counts and k: a clear usage error for 0, negatives and non-numbers."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
