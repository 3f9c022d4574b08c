# One file of ~630 lines on purpose: it alone is bind-mounted into the sandbox and run as a script.
"""The REPL worker: runs the model's code cells, inside the sandbox, one process per RLM.

Run as a script (`python -I -S -B bootstrap.py CTL_FD NICE`). It imports only the standard
library and never `rlm_async`: inside the sandbox only this file and the interpreter's own
install are visible. The engine imports this module too, for the protocol constants below.

The control channel is the socket on CTL_FD, never stdout: whatever the code prints goes to
fds 1 and 2, which the engine drains as plain data, so printed text cannot pose as a frame.
A frame is a `HEADER` (JSON length, blob length) then UTF-8 JSON, then the blob.

    worker -> engine   hello {pid}   (first, unasked: the interpreter is up; a pool may
                       keep the worker waiting here for its context)
    engine -> worker   init {limits, uid, tools, values, ...} + context blob | exec {cell, code}
                       | getvar {name} | describe | setvar {name, type, aliases, append} + value blob
                       | reply {id, results} or {id, error, message}
                       | result {id, index, text} ... then reply {id, end}   (a stream)
    worker -> engine   ready {pid} | request {id, kind, lengths, model[, tool]} + prompts blob
                       | cancel {id}   (a stream the code stopped iterating)
                       | done {cell, status, error, final_answer, dropped} | var {found, value}
                       | set {name} | names {names: {name: description}}

A request's prompts travel as one blob, each prompt UTF-8 and `lengths` giving its size in
bytes, so neither side escapes, parses or copies 40 MB of JSON for a big fan-out.

Everything in this process, this module included, is reachable by the model's code, so
nothing here is a security boundary: the engine treats every frame from here as untrusted.
The code below only tries to keep honest code working when it does odd things (rebinding
`sys.stdout`, tampering with `sys.modules`, calling `llm_query` from threads).
"""

from __future__ import annotations

import ast
import builtins
import io
import json
import linecache
import os
import queue
import resource
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

PROTOCOL_VERSION = 2
HEADER = struct.Struct(">II")
"""Every frame starts with (JSON length, blob length), both big-endian uint32."""
REQUEST_KINDS = ("llm_query", "llm_batch", "llm_batch_stream", "rlm_query", "rlm_batch", "tool")
EXIT_ENGINE_GONE = 0
EXIT_MEMORY = 3
EXIT_PROTOCOL = 4
ERROR_TEXT_LIMIT = 10_000
"""Characters of a formatted traceback kept (its end, where the exception is)."""
HELPER_NAMES = frozenset(
    {
        "context",
        "answer",
        "llm_query",
        "llm_batch",
        "llm_batch_as_completed",
        "llm_query_batched",
        "rlm_query",
        "rlm_query_batched",
        "SHOW_VARS",
        "FINAL_VAR",
        "BudgetExceeded",
        "ToolError",
    }
)
PLAIN_TYPES = (str, int, float, bool, list, dict, tuple)
"""The types whose variables the official observation format lists."""

_DESCRIBED = 200
"""Variables `describe` lists at most."""

_THIS_FILE = os.path.abspath(__file__)
# Private references taken at start-up, so code that rebinds `json.dumps` or empties
# `sys.modules` degrades its own worker rather than the protocol code.
_dumps = json.dumps
_loads = json.loads
_monotonic = time.monotonic
_MAIN_PID = [0]
"""The worker's own pid, set at start-up, to tell it from children the code forks."""


class BudgetExceeded(Exception):
    """The engine refused this sub-call: a budget cap would be crossed. Catch it to stop."""


class ToolError(Exception):
    """A custom tool failed on the host: it raised (the message ends with its traceback), or
    its arguments or result were not JSON data."""


# ---------------------------------------------------------------------------- framing
def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, 1 << 22))
        if k == 0:
            raise EOFError("the engine closed the control channel")
        got += k
    return buf


def encode_frame(obj: dict[str, Any], blob_len: int = 0) -> bytes:
    """A frame's header and JSON; the caller sends the `blob_len` bytes of blob after them.
    Lone surrogates in strings become '?', so the JSON is always valid UTF-8."""
    data = _dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")
    return HEADER.pack(len(data), blob_len) + data


def encode_prompts(prompts: list[str]) -> list[bytes]:
    """A request's prompts, each as UTF-8: the pieces of its blob. Lone surrogates become
    '?', as `encode_frame` makes them in JSON."""
    return [p.encode("utf-8", "replace") for p in prompts]


def _send_parts(sock: socket.socket, head: bytes, parts: list[bytes]) -> None:
    """`sendall` of `head` and then `parts`. Big prompts go out as they are, not joined into
    one more copy of them all; tiny ones are joined, as sending many small pieces is slower
    than one copy (measured on 40 MB: 256-byte pieces 4x slower than joining, 4 KiB pieces
    a fifth of its time)."""
    blob_len = sum(map(len, parts))
    if blob_len < 4096 * len(parts):
        sock.sendall(head + b"".join(parts))
        return
    views = [memoryview(head)] + [memoryview(b) for b in parts if b]
    i = 0
    while i < len(views):
        sent = sock.sendmsg(views[i : i + 512])  # under IOV_MAX
        while sent:
            n = views[i].nbytes
            if sent < n:
                views[i] = views[i][sent:]
                break
            sent -= n
            i += 1


class _Channel:
    """The worker's end of the control socket: one reader thread, a lock for writers."""

    max_prompts = 1 << 62
    """Prompts one request may carry (`SandboxConfig.max_batch_prompts`)."""

    def __init__(self, sock: socket.socket, max_message: int) -> None:
        self.sock = sock
        self.max_message = max_message
        self.send_lock = threading.Lock()
        self.commands: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.waiters: dict[int, list[Any]] = {}
        self.waiters_lock = threading.Lock()
        self.next_id = 0
        self.cell_active = False
        self.deferred_cancels: list[int] = []
        """Streams dropped while this thread was sending (a GC pass inside `send`): their
        `cancel` goes out with the next frame instead of interleaving with this one."""

    def recv(self) -> tuple[dict[str, Any], bytearray]:
        head = _recv_exact(self.sock, HEADER.size)
        json_len, blob_len = HEADER.unpack(head)
        obj = _loads(bytes(_recv_exact(self.sock, json_len)).decode("utf-8"))
        if not isinstance(obj, dict) or not isinstance(obj.get("op"), str):
            raise ValueError("malformed frame from the engine")
        blob = _recv_exact(self.sock, blob_len) if blob_len else bytearray()
        return obj, blob

    def send(self, obj: dict[str, Any]) -> None:
        frame = encode_frame(obj)
        with self.send_lock:
            self.sock.sendall(frame)

    def reader(self) -> None:
        """Thread body: route replies to the threads waiting for them, commands to main."""
        try:
            while True:
                obj, blob = self.recv()
                op = obj["op"]
                if op in ("reply", "result"):
                    with self.waiters_lock:
                        rid = obj.get("id")
                        slot = self.waiters.get(rid) if op == "result" else self.waiters.pop(rid, None)  # type: ignore[arg-type]
                    if isinstance(slot, queue.SimpleQueue):
                        slot.put(obj)  # a stream: results, then its reply
                    elif slot is not None and op == "reply":
                        slot[1] = obj
                        slot[0].set()
                else:
                    if blob:
                        obj["_blob"] = blob
                    self.commands.put(obj)
        except EOFError:
            os._exit(EXIT_ENGINE_GONE)
        except MemoryError:
            os._exit(EXIT_MEMORY)
        except BaseException:
            os._exit(EXIT_PROTOCOL)

    def request(
        self, kind: str, prompts: list[str], model: str | None, hedge: bool | None = None
    ) -> list[str]:
        """Send one request and block this thread until its reply. Thread-safe."""
        if len(prompts) > self.max_prompts:
            # Checked before any work: a batch this large is one error, not millions of frames' worth.
            raise ValueError(
                f"{kind}: {len(prompts):,} prompts in one call, over the sandbox limit of "
                f"{self.max_prompts:,} (SandboxConfig.max_batch_prompts); send fewer prompts per call"
            )
        reply = self._exchange(kind, prompts, model, **({} if hedge is None else {"hedge": hedge}))
        if "results" in reply:
            results = reply["results"]
            if isinstance(results, list) and len(results) == len(prompts):
                return [r if isinstance(r, str) else str(r) for r in results]
            raise RuntimeError(f"{kind}: malformed reply from the engine")
        _raise_refusal(reply)

    def call_tool(self, name: str, payload: str) -> str:
        """Call the host's tool `name` with JSON `payload`; its result as JSON text."""
        reply = self._exchange("tool", [payload], None, tool=name)
        results = reply.get("results")
        if isinstance(results, list) and len(results) == 1 and isinstance(results[0], str):
            return results[0]
        if reply.get("error") == "tool":
            raise ToolError(str(reply.get("message", "the tool failed")))
        if "results" in reply:
            raise RuntimeError(f"{name}: malformed reply from the engine")
        _raise_refusal(reply)

    def _exchange(self, kind: str, prompts: list[str], model: str | None, **extra: Any) -> dict[str, Any]:
        event = threading.Event()
        slot: list[Any] = [event, None]
        self._send_request(kind, prompts, model, slot, extra)
        event.wait()
        reply: dict[str, Any] = slot[1]
        return reply

    def stream(self, prompts: list[str], model: str | None, hedge: bool | None = None) -> _ResultStream:
        """Send a streaming request; its results arrive on the returned iterator."""
        results: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        extra = None if hedge is None else {"hedge": hedge}
        rid = self._send_request("llm_batch_stream", prompts, model, results, extra)
        return _ResultStream(self, rid, len(prompts), results)

    def cancel(self, rid: int) -> None:
        """Stop a stream's sub-calls; safe from `__del__` (see `deferred_cancels`)."""
        with self.waiters_lock:
            self.waiters.pop(rid, None)
        if self.send_lock.acquire(blocking=False):
            try:
                if self.cell_active:
                    self.sock.sendall(encode_frame({"op": "cancel", "id": rid}))
            finally:
                self.send_lock.release()
        else:
            self.deferred_cancels.append(rid)

    def _send_request(
        self, kind: str, prompts: list[str], model: str | None, slot: Any, extra: dict[str, Any] | None = None
    ) -> int:
        with self.waiters_lock:
            self.next_id += 1
            rid = self.next_id
            self.waiters[rid] = slot
        try:
            parts = encode_prompts(prompts)
            lengths = [len(b) for b in parts]
            blob_len = sum(lengths)
            head = encode_frame(
                {
                    "op": "request",
                    "id": rid,
                    "kind": kind,
                    "lengths": lengths,
                    "model": model,
                    # "hedge" only when the code chose one: other frames stay as they were
                    **(extra or {}),
                },
                blob_len,
            )
            size = len(head) + blob_len
            if size > self.max_message:
                raise ValueError(
                    f"{kind}: the request is {size:,} bytes, over the sandbox limit of "
                    f"{self.max_message:,} bytes; send fewer or shorter prompts per call"
                )
            with self.send_lock:
                # Checked under the lock that also sends `done`: no request can follow it.
                if not self.cell_active:
                    raise RuntimeError(f"{kind} can only be called while a cell is running")
                while self.deferred_cancels:
                    self.sock.sendall(encode_frame({"op": "cancel", "id": self.deferred_cancels.pop()}))
                _send_parts(self.sock, head, parts)
            del parts
        except BaseException:
            with self.waiters_lock:
                self.waiters.pop(rid, None)
            raise
        return rid


def _raise_refusal(reply: dict[str, Any]) -> NoReturn:
    message = str(reply.get("message", "the engine refused the request"))
    if reply.get("error") == "budget":
        raise BudgetExceeded(message)
    raise RuntimeError(message)


class _ResultStream:
    """`llm_batch_as_completed`'s iterator: `(index, answer)` as each sub-call finishes.
    Leaving it early (`break`, `close()`, a `with` block, or dropping it) cancels the
    sub-calls still running; their unspent budget goes back."""

    def __init__(
        self, channel: _Channel, rid: int, n: int, results: queue.SimpleQueue[dict[str, Any]]
    ) -> None:
        self._channel = channel
        self._rid = rid
        self._n = n
        self._results = results
        self._seen = 0
        self._finished = False

    def __iter__(self) -> _ResultStream:
        return self

    def __next__(self) -> tuple[int, str]:
        if self._finished:
            raise StopIteration
        obj = self._results.get()
        if obj["op"] == "result":
            index, text = obj.get("index"), obj.get("text")
            if not isinstance(index, int) or not 0 <= index < self._n or not isinstance(text, str):
                self.close()
                raise RuntimeError("llm_batch_as_completed: malformed result from the engine")
            self._seen += 1
            return index, text
        self._finished = True
        if obj.get("end") == self._n == self._seen:
            raise StopIteration
        _raise_refusal(obj)

    def __len__(self) -> int:
        return self._n

    def close(self) -> None:
        if not self._finished:
            self._finished = True
            self._channel.cancel(self._rid)

    def __enter__(self) -> _ResultStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except BaseException:
            pass  # at interpreter exit or with a broken socket: nothing to stop any more


# ---------------------------------------------------------------------------- output
class _BinaryView:
    """`sys.stdout.buffer`: bytes written here share the text stream's cap."""

    def __init__(self, owner: _CappedWriter) -> None:
        self._owner = owner

    def write(self, data: bytes) -> int:
        self._owner.write_bytes(bytes(data))
        return len(data)

    def flush(self) -> None:
        self._owner.flush()

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._owner.fileno()


class _CappedWriter(io.TextIOBase):
    """`sys.stdout`/`sys.stderr` during a cell: writes to the real fd until `limit` bytes,
    then counts and discards, so a huge print never costs more than counting it.

    Writes go to the fd (not to memory) so the engine sees partial output of a cell it
    kills. Small writes are batched: a newline flushes at most every 50 ms (the first line
    of a cell at once), and everything is flushed before each sub-call."""

    def __init__(self, fd: int, name: str) -> None:
        super().__init__()
        self._fd = fd
        self._name = name
        self._lock = threading.Lock()
        self._buf = bytearray()
        self._limit = 0
        self._written = 0
        self.dropped = 0
        self._last_flush = 0.0
        self.buffer = _BinaryView(self)

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]
        return "backslashreplace"

    @property
    def name(self) -> str:
        return self._name

    def reset(self, limit: int) -> None:
        with self._lock:
            self._flush_locked()
            self._limit = limit
            self._written = 0
            self.dropped = 0
            self._last_flush = 0.0  # a cell's first line goes out at once

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        self.flush()
        return self._fd

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        self.write_bytes(s.encode("utf-8", "backslashreplace"))
        return len(s)

    def write_bytes(self, data: bytes) -> None:
        with self._lock:
            room = self._limit - self._written
            if room <= 0:
                self.dropped += len(data)
                return
            if len(data) > room:
                self.dropped += len(data) - room
                data = data[:room]
            self._written += len(data)
            self._buf += data
            now = _monotonic()
            if len(self._buf) >= 65536 or (b"\n" in data and now - self._last_flush >= 0.05):
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        self._last_flush = _monotonic()
        while self._buf:
            try:
                n = os.write(self._fd, self._buf)
            except InterruptedError:
                continue
            except OSError:  # the code closed or broke the fd: what is left is lost
                self.dropped += len(self._buf)
                self._buf.clear()
                return
            del self._buf[:n]


# ---------------------------------------------------------------------------- the REPL
def _format_exception(exc: BaseException) -> str:
    """The end of the traceback, without this file's frames."""
    try:
        te = traceback.TracebackException.from_exception(exc, limit=None)
        for cur in _chain(te):
            frames = [f for f in cur.stack if os.path.abspath(f.filename) != _THIS_FILE]
            cur.stack = traceback.StackSummary.from_list(frames[-10:])
        text = "".join(te.format())
    except MemoryError:
        return f"{type(exc).__name__} (no memory left to format the traceback)"
    except BaseException:
        return f"{type(exc).__name__} (the exception could not be formatted)"
    if len(text) > ERROR_TEXT_LIMIT:
        text = "[... traceback truncated ...]\n" + text[-ERROR_TEXT_LIMIT:]
    return text


def _chain(te: traceback.TracebackException) -> list[traceback.TracebackException]:
    out: list[traceback.TracebackException] = []
    cur: traceback.TracebackException | None = te
    while cur is not None and len(out) < 20:
        out.append(cur)
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    return out


def _fit(text: str, max_bytes: int) -> str:
    """Cut `text` so its JSON encoding surely fits in `max_bytes` (≤ 6 bytes a character)."""
    keep = max(0, max_bytes // 8)
    if len(text) <= keep:
        return text
    return text[:keep] + f"\n[... truncated: {len(text) - keep:,} more characters ...]"


def _identity(fd: int) -> tuple[int, int] | None:
    """(device, inode) of what `fd` is open on, or None when it is closed."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class _Repl:
    def __init__(
        self,
        channel: _Channel,
        context: object,
        output_limit: int,
        *,
        tools: tuple[tuple[str, str], ...] = (),
        values: dict[str, Any] | None = None,
        list_variables: bool = False,
    ) -> None:
        self.channel = channel
        self.output_limit = output_limit
        self.list_variables = list_variables
        self.value_names = list(values or {})
        self.stdout = _CappedWriter(1, "<stdout>")
        self.stderr = _CappedWriter(2, "<stderr>")
        self.streams = {name: _identity(fd) for fd, name in ((1, "stdout"), (2, "stderr"))}
        """What fds 1 and 2 are at start: the engine's pipes. Code that closes or redirects
        them is reported, since nothing it prints could reach the engine afterwards."""
        self.ns: dict[str, Any] = {
            "__name__": "__main__",
            "__builtins__": builtins,
            "context": context,
            "context_0": context,
            "answer": {"content": None, "ready": False},
            "llm_query": self._llm_query,
            "llm_batch": self._llm_batch,
            "llm_batch_as_completed": self._llm_batch_as_completed,
            "llm_query_batched": self._llm_batch,
            "rlm_query": self._rlm_query,
            "rlm_query_batched": self._rlm_batch,
            "SHOW_VARS": self._show_vars,
            "FINAL_VAR": self._final_var,
            "BudgetExceeded": BudgetExceeded,
            "ToolError": ToolError,
        }
        self.owned: dict[str, Any] = {}
        """Variables the engine set (`setvar`): a later `append` extends the engine's list
        even when the code rebound the name."""
        for name, doc in tools:
            self.ns[name] = self._tool(name, doc)
        self.ns.update(values or {})

    # -- helpers visible to the code
    @staticmethod
    def _check_model(model: object) -> str | None:
        if model is not None and not isinstance(model, str):
            raise TypeError(f"model must be a str or None, not {type(model).__name__}")
        return model

    @staticmethod
    def _check_hedge(hedge: object) -> bool | None:
        if hedge is not None and not isinstance(hedge, bool):
            raise TypeError(f"hedge must be True, False or None, not {type(hedge).__name__}")
        return hedge

    @staticmethod
    def _check_prompts(name: str, prompts: object) -> list[str]:
        if isinstance(prompts, str) or not isinstance(prompts, list | tuple):
            raise TypeError(f"{name} takes a list of str prompts, not {type(prompts).__name__}")
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"{name}: every prompt must be a str, got {type(p).__name__}")
        return list(prompts)

    def _request(self, kind: str, prompts: list[str], model: object, hedge: object = None) -> list[str]:
        checked = self._check_model(model)
        hedged = self._check_hedge(hedge)
        # Progress printed before a slow sub-call should be visible if the cell is killed.
        self.stdout.flush()
        self.stderr.flush()
        return self.channel.request(kind, prompts, checked, hedged)

    def _llm_query(self, prompt: str, model: str | None = None, hedge: bool | None = None) -> str:
        """Ask a sub-model one question; returns its reply. `hedge=False`: no duplicate
        request even if the model hedges."""
        if not isinstance(prompt, str):
            raise TypeError(f"llm_query takes a str prompt, not {type(prompt).__name__}")
        return self._request("llm_query", [prompt], model, hedge)[0]

    def _llm_batch(
        self, prompts: list[str], model: str | None = None, hedge: bool | None = None
    ) -> list[str]:
        """Ask a sub-model several questions concurrently; replies come back in order.
        `hedge=False`: no duplicate requests even if the model hedges."""
        return self._request("llm_batch", self._check_prompts("llm_batch", prompts), model, hedge)

    def _llm_batch_as_completed(
        self, prompts: list[str], model: str | None = None, hedge: bool | None = None
    ) -> _ResultStream:
        """Like llm_batch, but yields (index, answer) as each sub-call finishes; leaving the
        loop early cancels the rest."""
        checked = self._check_prompts("llm_batch_as_completed", prompts)
        model = self._check_model(model)
        hedged = self._check_hedge(hedge)
        self.stdout.flush()
        self.stderr.flush()
        return self.channel.stream(checked, model, hedged)

    def _rlm_query(self, prompt: str, model: str | None = None, hedge: bool | None = None) -> str:
        """Hand one question to a child RLM (a plain sub-call at the depth limit)."""
        if not isinstance(prompt, str):
            raise TypeError(f"rlm_query takes a str prompt, not {type(prompt).__name__}")
        return self._request("rlm_query", [prompt], model, hedge)[0]

    def _rlm_batch(
        self, prompts: list[str], model: str | None = None, hedge: bool | None = None
    ) -> list[str]:
        """Hand several questions to child RLMs concurrently; replies come back in order."""
        return self._request("rlm_batch", self._check_prompts("rlm_query_batched", prompts), model, hedge)

    def _tool(self, name: str, doc: str) -> Callable[..., Any]:
        """The REPL's face of a host tool: its arguments go to the engine as JSON, the tool
        runs there, and its JSON result comes back. The tool itself never comes here."""
        channel, stdout, stderr = self.channel, self.stdout, self.stderr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                payload = _dumps({"args": list(args), "kwargs": kwargs}, ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise TypeError(
                    f"{name}: arguments must be JSON data (str, int, float, bool, None, lists, dicts "
                    f"with str keys) to reach the host: {exc}"
                ) from None
            stdout.flush()
            stderr.flush()
            return _loads(channel.call_tool(name, payload))

        call.__name__ = call.__qualname__ = name
        call.__doc__ = doc or None
        return call

    def _plain_variables(self) -> list[str]:
        """The names the official observation lists: plain-typed variables not starting with
        "_", in its order (answer, injected values, context_0, context, then the rest)."""
        first = ["answer", *self.value_names, "context_0", "context"]
        rest = [n for n in self.ns if n not in first]
        return [
            n
            for n in first + rest
            if n in self.ns and not n.startswith("_") and isinstance(self.ns[n], PLAIN_TYPES)
        ]

    def _show_vars(self) -> str:
        """The variables you created, with their types (and lengths where they have one)."""
        lines = []
        for name, value in list(self.ns.items()):
            if name.startswith("_") or name in HELPER_NAMES or name == "context_0":
                continue
            if type(value).__name__ in ("module", "function", "type", "builtin_function_or_method"):
                continue
            desc = type(value).__name__
            try:
                desc += f", len {len(value)}"
            except Exception:
                pass
            lines.append(f"{name}: {desc}")
        return "Variables: " + (", ".join(lines) if lines else "(none yet)")

    def _final_var(self, name: object) -> str:
        """The value of the variable `name` as a string: what FINAL_VAR(name) will answer."""
        if not isinstance(name, str):
            return str(name)
        key = name.strip().strip("'\"")
        if key in self.ns:
            return str(self.ns[key])
        return f"Error: variable {key!r} is not defined. {self._show_vars()}"

    # -- commands from the engine
    def run_cell(self, cell: int, code: str) -> None:
        sys.stdout, sys.stderr = self.stdout, self.stderr
        self.stdout.reset(self.output_limit)
        self.stderr.reset(self.output_limit)
        with self.channel.send_lock:
            self.channel.cell_active = True
        status, error = "ok", None
        try:
            self._execute(cell, code)
        except MemoryError as exc:
            status, error = "memory", _format_exception(exc)
        except BaseException as exc:
            status, error = "error", _format_exception(exc)
        if os.getpid() != _MAIN_PID[0]:
            # A child the code forked ran to the end of the cell: it must not report as
            # the worker (nor wait for commands meant for it).
            self.stdout.flush()
            self.stderr.flush()
            os._exit(0)
        self.stdout.flush()
        self.stderr.flush()
        final = None
        try:
            final = self._final_answer()
        except MemoryError as exc:
            status, error = "memory", _format_exception(exc)
        except BaseException as exc:
            if status == "ok":
                status, error = (
                    "error",
                    "answer['content'] could not be made a str:\n" + _format_exception(exc),
                )
        budget = self.channel.max_message - 2 * ERROR_TEXT_LIMIT - 4096
        done = {
            "op": "done",
            "cell": cell,
            "status": status,
            "error": error,
            "final_answer": None if final is None else _fit(final, budget),
            "dropped": [self.stdout.dropped, self.stderr.dropped],
        }
        broken = [
            f"{name} (fd {fd}) was {'closed' if now is None else 'redirected'}"
            for (name, was), fd in zip(self.streams.items(), (1, 2), strict=True)
            if (now := _identity(fd)) != was
        ]
        if broken:
            done["streams"] = broken
        if self.list_variables:
            try:
                done["variables"] = self._plain_variables()
            except BaseException:
                pass  # a namespace the code wrecked: no listing, never a broken report
        frame = encode_frame(done)
        with self.channel.send_lock:
            self.channel.cell_active = False
            self.channel.sock.sendall(frame)

    def _execute(self, cell: int, code: str) -> None:
        filename = f"<cell-{cell}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        tree = ast.parse(code, filename, "exec")
        last: ast.expr | None = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = tree.body[-1].value  # echoed like the interactive interpreter does
            del tree.body[-1]
        exec(compile(tree, filename, "exec"), self.ns)
        if last is not None:
            value = eval(compile(ast.Expression(last), filename, "eval"), self.ns)
            if value is not None:
                self.stdout.write(repr(value) + "\n")

    def _final_answer(self) -> str | None:
        box = self.ns.get("answer")
        if isinstance(box, dict) and dict.get(box, "ready") is True:
            return str(dict.get(box, "content"))
        return None

    def set_variable(self, command: dict[str, Any], blob: bytearray) -> None:
        """`setvar`: bind `name` (and each of `aliases`) to the value in the blob; with
        `append`, append it to the list the engine set under `name` instead."""
        name, aliases = command["name"], command.get("aliases") or []
        if not isinstance(name, str) or not name.isidentifier() or not isinstance(aliases, list):
            raise ValueError("malformed setvar")
        value = _load_context(command.get("type"), blob)
        del blob
        if command.get("append"):
            owned = self.owned.get(name)
            if not isinstance(owned, list):
                owned = self.owned[name] = []
            owned.append(value)
            value = owned
        self.owned[name] = value
        for key in (name, *aliases):
            if not isinstance(key, str) or not key.isidentifier():
                raise ValueError("malformed setvar alias")
            self.ns[key] = value
        self.channel.send({"op": "set", "name": name})

    def describe_variables(self) -> None:
        """`describe`: each variable's type (and length where it has one), never its value,
        at most `_DESCRIBED` of them: the official log's `locals`, without the context."""
        names: dict[str, str] = {}
        for name, value in list(self.ns.items()):
            if name.startswith("_") or name in HELPER_NAMES - {"context"}:
                continue
            kind = type(value).__name__
            if kind in ("module", "function", "type", "builtin_function_or_method"):
                continue
            desc = f"<{kind}>"
            try:
                desc = f"<{kind} of length {len(value)}>"
            except Exception:
                pass
            names[name] = desc
            if len(names) >= _DESCRIBED:
                break
        self.channel.send({"op": "names", "names": names})

    def get_variable(self, name: object) -> None:
        budget = self.channel.max_message - 4096
        reply: dict[str, Any] = {"op": "var", "found": False, "value": None}
        if isinstance(name, str) and name in self.ns:
            try:
                value = str(self.ns[name])
            except BaseException as exc:
                value = f"<str({name}) raised {_format_exception(exc).strip().splitlines()[-1]}>"
            reply = {"op": "var", "found": True, "value": _fit(value, budget)}
        self.channel.send(reply)


# ---------------------------------------------------------------------------- start-up
def _libc_prctl(option: int, arg: int) -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(option, arg, 0, 0, 0)
    except Exception:  # best effort: no ctypes, no prctl
        pass


_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_NO_NEW_PRIVS = 38


def _load_sibling(name: str) -> Any:
    """A stdlib-only module beside this file (`_confine`), loaded by path: no package here."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "rlm_sandbox" + name, os.path.join(os.path.dirname(_THIS_FILE), name + ".py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _confine(init: dict[str, Any], confine: Any) -> None:
    """Apply resource limits, then the tier's own confinement, before any untrusted code or
    data is touched: bubblewrap's worker drops root; the landlock tier's locks itself down
    (`_confine.lock_down`); the none tier only drops root when it can."""
    limits: dict[str, int | None] = init.get("limits", {})
    table = {
        "as": resource.RLIMIT_AS,
        "cpu": resource.RLIMIT_CPU,
        "fsize": resource.RLIMIT_FSIZE,
        "nofile": resource.RLIMIT_NOFILE,
        "nproc": resource.RLIMIT_NPROC,
        "core": resource.RLIMIT_CORE,
    }
    for key, value in limits.items():
        if value is None or key not in table:
            continue
        soft, hard = value, value
        if key == "cpu":
            hard = value + 2  # SIGXCPU at the soft limit; SIGKILL if the code ignores it
        resource.setrlimit(table[key], (soft, hard))
    # A file write past RLIMIT_FSIZE should be an OSError the code can see, not a kill.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    tier = init.get("tier")
    if confine is not None:
        confine.lock_down(init["lockdown"])
        return
    if tier == "none":
        _libc_prctl(_PR_SET_NO_NEW_PRIVS, 1)
    uid = init.get("uid")
    if isinstance(uid, int):
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    if tier == "none":
        # Without a pid namespace: die with the engine, and keep orphans as our
        # descendants so the engine can find and kill them.
        _libc_prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
        _libc_prctl(_PR_SET_CHILD_SUBREAPER, 1)


def _load_context(kind: object, blob: bytearray) -> object:
    if kind == "str":
        return blob.decode("utf-8", "surrogatepass")
    if kind == "json":
        return _loads(blob.decode("utf-8", "surrogatepass"))
    raise ValueError(f"unknown context type {kind!r}")


def _start_reader(channel: _Channel) -> None:
    """The control channel's reader thread; when it cannot start, say why on stderr (which
    the engine puts in its error) and exit 1."""
    try:
        threading.Thread(target=channel.reader, name="rlm-control", daemon=True).start()
    except RuntimeError as exc:  # "can't start new thread": EAGAIN from clone()
        soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
        limit = "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
        sys.stderr.write(
            f"rlm worker: cannot start its control thread ({exc}): RLIMIT_NPROC is {limit} "
            f"(set from SandboxConfig.max_processes) and counts every process and thread of "
            f"uid {os.getuid()}\n"
        )
        sys.stderr.flush()
        os._exit(1)


def main(argv: list[str]) -> None:
    if len(argv) > 2 and int(argv[2]):
        # Before anything else of the start-up: from here on the worker takes the CPU only
        # as the engine's loop leaves it. Unprivileged code can raise it, never lower it.
        os.nice(int(argv[2]))
    sock = socket.socket(fileno=int(argv[1]))
    sock.setblocking(True)
    channel = _Channel(sock, max_message=1 << 30)
    # Up and waiting: everything costly in starting a worker (the sandbox, the interpreter,
    # this module's imports) is done before its context exists, so a pool can pay it early.
    channel.send({"op": "hello", "pid": os.getpid()})
    try:
        head = _recv_exact(sock, HEADER.size)
        json_len, blob_len = HEADER.unpack(head)
        init = _loads(bytes(_recv_exact(sock, json_len)).decode("utf-8"))
    except EOFError:  # the engine went away while this worker waited in its pool
        os._exit(EXIT_ENGINE_GONE)
    if init.get("op") != "init" or init.get("version") != PROTOCOL_VERSION:
        os._exit(EXIT_PROTOCOL)
    confine = None
    if init.get("tier") == "landlock":
        confine = _load_sibling("_confine")
        confine.fork_supervisor(sock.fileno())  # returns in the worker; the parent supervises
    _MAIN_PID[0] = os.getpid()
    _confine(init, confine)
    channel.max_message = int(init["max_message"])
    channel.max_prompts = int(init.get("max_prompts") or channel.max_prompts)
    try:
        context = _load_context(init.get("context_type"), _recv_exact(sock, blob_len))
    except MemoryError:
        os._exit(EXIT_MEMORY)
    # Before stderr is the cell's: a failure here must reach the engine's error message.
    _start_reader(channel)
    try:
        values = _loads(init.get("values") or "{}")
    except MemoryError:
        os._exit(EXIT_MEMORY)
    repl = _Repl(
        channel,
        context,
        int(init["output_limit"]),
        tools=tuple((str(n), str(d)) for n, d in init.get("tools") or ()),
        values=values,
        list_variables=bool(init.get("list_variables")),
    )
    del context
    sys.stdout, sys.stderr = repl.stdout, repl.stderr
    channel.send({"op": "ready", "pid": os.getpid(), "uid": os.getuid()})
    handlers: dict[str, Callable[[dict[str, Any]], None]] = {
        "exec": lambda c: repl.run_cell(int(c["cell"]), str(c["code"])),
        "getvar": lambda c: repl.get_variable(c.get("name")),
        "setvar": lambda c: repl.set_variable(c, c.pop("_blob", bytearray())),
        "describe": lambda c: repl.describe_variables(),
    }
    while True:
        command = channel.commands.get()
        try:
            handlers[command["op"]](command)
        except MemoryError:
            os._exit(EXIT_MEMORY)
        except (KeyError, ValueError, TypeError):
            os._exit(EXIT_PROTOCOL)


if __name__ == "__main__":
    main(sys.argv)
