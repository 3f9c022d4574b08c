"""The one test of "is this a number" for configuration values.

`True` is 1 to Python and `"5"` compares with nothing: a config value of either reached a
comparison deep in a check and became a `TypeError` (or, for a bool, was taken as 1).
"""

from __future__ import annotations

__all__ = ["is_number", "is_whole_number"]


def is_number(value: object) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_whole_number(value: object) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)
