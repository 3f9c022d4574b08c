"""How a context is made ready for its worker (`encode_context_async`): an ASCII str on the
event loop, since that costs nothing, and anything that costs work in a thread, with the
same bytes either way."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread
import pytest

from rlm_async.exceptions import ContextTypeError
from rlm_async.sandbox._channel import Utf8Text
from rlm_async.sandbox._process import encode_context, encode_context_async

pytestmark = pytest.mark.anyio


@pytest.fixture
def thread_calls(monkeypatch: pytest.MonkeyPatch) -> list[Callable[..., Any]]:
    """The functions sent to a worker thread during the test (they still run there)."""
    calls: list[Callable[..., Any]] = []
    real = anyio.to_thread.run_sync

    async def recording(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        calls.append(func)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", recording)
    return calls


def wire_bytes(blob: Any) -> bytes:
    return b"".join(blob.pieces()) if isinstance(blob, Utf8Text) else bytes(blob)


async def test_an_ascii_str_is_encoded_without_a_thread(thread_calls: list[Callable[..., Any]]) -> None:
    text = "line one\nline two\n" * 50_000
    kind, blob = await encode_context_async(text)
    assert thread_calls == []
    assert kind == "str" and len(blob) == len(text)
    assert wire_bytes(blob) == text.encode("utf-8")


@pytest.mark.parametrize(
    "context",
    ["caf\u00e9 " * 10_000, "lone surrogate \ud800 kept", ["a", "b\u00e9"], {"k": [1, 2.5, None]}],
    ids=["non-ascii-str", "surrogate", "list", "dict"],
)
async def test_work_goes_to_a_thread_and_gives_the_same_bytes(
    context: Any, thread_calls: list[Callable[..., Any]]
) -> None:
    kind, blob = await encode_context_async(context)
    assert thread_calls == [encode_context]
    expected_kind, expected = encode_context(context)
    assert kind == expected_kind
    assert wire_bytes(blob) == wire_bytes(expected) and len(blob) == len(wire_bytes(blob))
    if kind == "json":
        assert json.loads(wire_bytes(blob).decode("utf-8", "surrogatepass")) == context


async def test_a_value_json_cannot_carry_is_refused_by_name(thread_calls: list[Callable[..., Any]]) -> None:
    unserialisable: Any = ["fine", object()]
    with pytest.raises(ContextTypeError, match="JSON-serialisable"):
        await encode_context_async(unserialisable)
    assert thread_calls == [encode_context]
