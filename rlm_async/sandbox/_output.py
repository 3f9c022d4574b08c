"""Capturing a worker's stdout and stderr: its pipes are drained as plain data, the first
`limit` bytes kept and the rest counted, so no amount of output reaches the engine's memory."""

from __future__ import annotations

import os

import anyio

__all__ = ["Capture", "drain", "drain_now"]

_MiB = 1 << 20


class Capture:
    """Keeps the first `limit` bytes of a stream; counts the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.dropped = 0

    def feed(self, data: bytes) -> None:
        room = self.limit - len(self.data)
        if room >= len(data):
            self.data += data
        else:
            if room > 0:
                self.data += data[:room]
            self.dropped += len(data) - max(room, 0)

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


async def drain(fd: int, capture: Capture) -> None:
    """Read a worker's stdout or stderr pipe until EOF or cancellation."""
    while True:
        try:
            data = os.read(fd, _MiB)
        except BlockingIOError:
            await anyio.wait_readable(fd)
            continue
        except OSError:
            return
        if not data:
            return
        capture.feed(data)


def drain_now(fd: int, capture: Capture, budget: int) -> None:
    """Take what is already in the pipe, without waiting: output written before the worker
    reported the cell done is there by then. `budget` stops a writer that never pauses."""
    while budget > 0:
        try:
            data = os.read(fd, _MiB)
        except OSError:  # BlockingIOError: the pipe is empty
            return
        if not data:
            return
        capture.feed(data)
        budget -= len(data)
