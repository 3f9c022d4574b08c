"""The engine's end of a worker's control socket: length-prefixed JSON frames.

Frames from the worker are untrusted input. Every size is checked against
`max_inbound` before anything is allocated, the JSON must be strict UTF-8 and an object
with a string `op`, and only a `request` frame may carry a blob (its prompts, which
`_protocol` splits and decodes). Anything else raises `ProtocolViolation`, and the
caller kills the worker: a broken frame costs the worker, never the engine.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import anyio

from ..exceptions import SandboxError
from ._bootstrap import HEADER

__all__ = ["Blob", "Channel", "ChannelClosed", "ProtocolViolation", "Utf8Text"]

_CHUNK = 1 << 20
ATOMIC_SEND_S = 10.0
"""How long an atomic send may take: the worker's reader thread drains its socket at once,
so only a worker that stopped reading (hostile or wedged) hits this."""


class Utf8Text:
    """A str sent as its UTF-8 bytes without ever holding them whole: `Channel.send`
    encodes it a slice at a time, so a 40 MB context costs the engine one slice beside the
    str it holds anyway, not a second 40 MB copy. The same bytes as
    `text.encode("utf-8", "surrogatepass")` (that codec encodes each code point alone, so a
    slice boundary changes nothing)."""

    __slots__ = ("nbytes", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        # An ASCII str (known without a scan) is its own length in bytes; other text is
        # measured by encoding it once, a slice at a time (callers do this off the loop).
        self.nbytes = len(text) if text.isascii() else sum(len(p) for p in self.pieces())

    def __len__(self) -> int:
        return self.nbytes

    def pieces(self) -> Iterator[bytes]:
        text = self.text
        for start in range(0, len(text), _CHUNK):
            yield text[start : start + _CHUNK].encode("utf-8", "surrogatepass")


Blob = bytes | bytearray | memoryview | Utf8Text
"""What a frame may carry after its JSON."""


class ProtocolViolation(SandboxError):
    """The worker sent something that is not a valid frame; it is killed."""


class ChannelClosed(SandboxError):
    """The worker's end of the socket closed (it exited, or closed the fd)."""


class Channel:
    def __init__(self, sock: socket.socket, *, max_inbound: int) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._max_inbound = max_inbound
        self._mid_frame = False
        self._send_lock = anyio.Lock()
        self.closed = False

    async def send(self, obj: dict[str, Any], blob: Blob = b"", *, atomic: bool = False) -> None:
        """Send one frame. `atomic`: the frame is never left half-sent by a cancellation
        (which would desynchronise a worker that lives on); it gets `ATOMIC_SEND_S` seconds,
        after which the channel counts as broken (`ChannelClosed`) and the worker must go."""
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")
        if self.closed:
            raise ChannelClosed("the control channel is closed")
        async with self._send_lock:
            if not atomic:
                await self._send_all(HEADER.pack(len(data), len(blob)) + data)
                await self._send_blob(blob)
                return
            with anyio.CancelScope(shield=True), anyio.move_on_after(ATOMIC_SEND_S) as scope:
                await self._send_all(HEADER.pack(len(data), len(blob)) + data)
                await self._send_blob(blob)
            if scope.cancelled_caught:
                self.close()
                raise ChannelClosed(f"the worker did not read a frame within {ATOMIC_SEND_S} s")

    async def readable(self) -> None:
        """Until a frame (or the end of the channel) can be read; nothing is read, so a
        caller may stop waiting at any time."""
        await anyio.wait_readable(self._sock)

    async def _send_blob(self, blob: Blob) -> None:
        if isinstance(blob, Utf8Text):
            for piece in blob.pieces():
                await self._send_all(piece)
        elif blob:
            await self._send_all(blob)

    async def _send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self._sock.send(view[: 4 * _CHUNK])
            except BlockingIOError:
                await anyio.wait_writable(self._sock)
                continue
            except OSError as exc:  # EPIPE / ECONNRESET: the worker is gone
                raise ChannelClosed(f"the worker closed its control channel ({exc})") from exc
            view = view[sent:]

    async def _read(self, n: int) -> bytearray:
        """Exactly `n` bytes, received straight into one buffer of that size: a 40 MB blob
        is neither grown piece by piece nor copied afterwards. `n` is checked by the caller."""
        buf = bytearray(n)
        with memoryview(buf) as view:
            got = 0
            while got < n:
                try:
                    k = self._sock.recv_into(view[got:])
                except BlockingIOError:
                    await anyio.wait_readable(self._sock)
                    continue
                except OSError as exc:
                    raise ChannelClosed(f"the worker's control channel failed ({exc})") from exc
                if not k:
                    raise ChannelClosed("the worker closed its control channel")
                got += k
        return buf

    async def receive(self) -> tuple[dict[str, Any], bytearray]:
        """The next frame: its JSON object and its blob (empty unless a `request` sent one).

        A receive cancelled (or refused) mid-frame leaves the rest of that frame unread, so
        the channel refuses to go on (`ChannelClosed`); every caller kills the worker then
        anyway."""
        if self._mid_frame:
            raise ChannelClosed("an earlier receive stopped mid-frame; the channel is out of step")
        self._mid_frame = True
        json_len, blob_len = HEADER.unpack(await self._read(HEADER.size))
        if json_len + blob_len > self._max_inbound:
            raise ProtocolViolation(
                f"the worker sent a {json_len + blob_len:,}-byte frame ({json_len:,} JSON, "
                f"{blob_len:,} blob), over the limit of {self._max_inbound:,} bytes"
            )
        raw = await self._read(json_len)
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise ProtocolViolation(f"the worker sent a frame that is not UTF-8 JSON ({exc})") from None
        del raw
        if not isinstance(obj, dict) or not isinstance(obj.get("op"), str):
            raise ProtocolViolation("the worker sent a frame that is not an object with an 'op'")
        if blob_len and obj["op"] != "request":
            raise ProtocolViolation(
                f"the worker sent a {blob_len:,}-byte blob with a {obj['op']!r:.40} frame; only requests carry one"
            )
        blob = await self._read(blob_len)
        self._mid_frame = False
        return obj, blob

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            anyio.notify_closing(self._sock)
            self._sock.close()
