"""Context validation: what can be loaded into a REPL, and the error for what cannot."""

from __future__ import annotations

import pytest

from rlm_async._context import validate_context
from rlm_async._prompts import describe_context, first_user_message
from rlm_async.exceptions import ConfigError, ContextTypeError


class TestValidateContext:
    @pytest.mark.parametrize("ctx", ["text", ["a", "b"], {"k": "v", "n": [1, {"x": None}]}, [], ""])
    def test_accepted(self, ctx: object) -> None:
        """str, list of str and dict of JSON data are accepted unchanged."""
        assert validate_context(ctx) is ctx

    @pytest.mark.parametrize(
        ("ctx", "needle"),
        [
            (b"bytes", "decode bytes"),
            (42, "int"),
            (["a", 1], "item 1 is a int"),
            ({1: "a"}, "keys must be str"),
            ({"k": object()}, "JSON data"),
        ],
    )
    def test_rejected_with_fix(self, ctx: object, needle: str) -> None:
        """An unsupported context raises ContextTypeError naming the problem."""
        with pytest.raises(ContextTypeError, match=needle):
            validate_context(ctx)

    def test_is_config_error(self) -> None:
        """A bad context is a configuration error (and a TypeError)."""
        with pytest.raises(ConfigError):
            validate_context(3.5)
        with pytest.raises(TypeError):
            validate_context(3.5)


class TestMetadata:
    def test_root_sees_metadata_not_context(self) -> None:
        """The first message holds type, length and a preview, never the whole context."""
        ctx = "A" * 600 + "SECRET-TAIL"
        msg = first_user_message(describe_context(ctx), "find it")
        assert "a str with 611 total characters" in msg
        assert "SECRET-TAIL" not in msg
        assert "Query: find it" in msg

    def test_long_list_lengths_are_summarised(self) -> None:
        """A list of many items lists a few lengths and a summary, not all of them."""
        ctx = ["x" * i for i in range(1, 1001)]
        msg = first_user_message(describe_context(ctx), None)
        assert "1000 items" in msg and "max 1000" in msg
        assert len(msg) < 2000

    def test_metadata_is_deterministic(self) -> None:
        """The same context gives byte-identical messages (prefix caching depends on it)."""
        ctx = {"b": "2", "a": "1"}
        assert first_user_message(describe_context(ctx), "q") == first_user_message(
            describe_context(ctx), "q"
        )
