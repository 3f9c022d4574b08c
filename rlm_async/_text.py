"""Text that crosses a boundary: one rule for lone surrogates and invalid UTF-8.

A Python `str` may hold lone surrogates ("\\ud800": JSON allows the escape, and a user's
context can carry one), which cannot be encoded as UTF-8; bytes from a server may not be
valid UTF-8. Either one, met by a strict `encode`/`decode` deep inside the engine (the JSON
body of the next request, the journal, the trace), used to end the whole query with a
`UnicodeEncodeError`. Text is made safe where it enters: each lone surrogate becomes
U+FFFD (the replacement character), each invalid byte sequence likewise.
"""

from __future__ import annotations

import re

__all__ = ["decode_utf8", "scrub"]

_SURROGATE = re.compile("[\ud800-\udfff]")


def scrub(text: str) -> str:
    """`text` with every lone surrogate replaced by U+FFFD; the same object when it has none
    (the common case costs one `isascii`, or one encode for non-ASCII text)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def decode_utf8(data: bytes) -> str:
    """Bytes from outside as text: invalid UTF-8 sequences become U+FFFD."""
    return data.decode("utf-8", "replace")
