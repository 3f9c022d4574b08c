"""Checking a user's context before any process starts or any money is spent."""

from __future__ import annotations

from typing import Any

from .exceptions import ContextTypeError

__all__ = ["Context", "validate_context"]

Context = str | list[str] | dict[str, Any]

_JSON_SCALARS = (str, int, float, bool, type(None))


def validate_context(context: object) -> Context:
    """Return `context` unchanged if rlm_async can load it into a REPL, else raise.

    Accepted: a `str`; a `list` of `str`; a `dict` with `str` keys whose values are JSON
    data (str, numbers, bools, None, lists, dicts). The check is shallow for lists and
    dicts (the first bad item is named), and deep values are checked when the worker
    serialises them.
    """
    if isinstance(context, str):
        return context
    if isinstance(context, list):
        for i, item in enumerate(context):
            if not isinstance(item, str):
                raise ContextTypeError(
                    f"context is a list whose item {i} is a {type(item).__name__}; a list context must "
                    "hold only str (join or json.dumps the items first)"
                )
        return context
    if isinstance(context, dict):
        for key, value in context.items():
            if not isinstance(key, str):
                raise ContextTypeError(
                    f"context is a dict with a {type(key).__name__} key {key!r}; keys must be str"
                )
            if not isinstance(value, (*_JSON_SCALARS, list, dict)):
                raise ContextTypeError(
                    f"context[{key!r}] is a {type(value).__name__}; dict values must be JSON data "
                    "(str, numbers, bools, None, lists, dicts)"
                )
        return context
    raise ContextTypeError(
        f"context is a {type(context).__name__}; pass a str, a list of str, or a dict "
        "(read files and decode bytes before calling)"
    )
