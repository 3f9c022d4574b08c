"""RPM/TPM limits: the buckets with time moved by hand, then the 429s and headers a client sees."""

from __future__ import annotations

import httpx
import pytest

from rlm_async._types import Message, ModelRequest
from rlm_async.exceptions import RateLimited
from rlm_async.sim import RateLimiter, RateLimits, SimConfig, SimServer, go_duration
from rlm_async.transport import OpenAITransport, parse_duration, parse_rate_limit_headers

pytestmark = pytest.mark.anyio


class TestGoDuration:
    @pytest.mark.parametrize(
        ("seconds", "text"),
        [
            (0, "0s"),
            (0.012, "12ms"),
            (0.9994, "1s"),
            (1.5, "1.5s"),
            (20, "20s"),
            (360, "6m0s"),
            (3723, "1h2m3s"),
        ],
    )
    def test_formats_like_go_and_parses_back(self, seconds: float, text: str) -> None:
        """Resets are Go durations, as OpenAI sends them, and the transport parses them back."""
        assert go_duration(seconds) == text
        assert parse_duration(text) == pytest.approx(seconds, abs=1e-3)


class TestBuckets:
    def test_rpm_refuses_the_request_over_the_limit_and_says_when_to_retry(self) -> None:
        """With rpm=3 the fourth request at once is refused, told to wait 20 s, and fits after that."""
        limiter = RateLimiter(RateLimits(rpm=3), now=0.0)
        assert all(limiter.admit(10, now=0.0).allowed for _ in range(3))
        refused = limiter.admit(10, now=0.0)
        assert not refused.allowed and refused.limit_type == "requests"
        assert refused.retry_after_s == pytest.approx(20.0)
        assert refused.headers["retry-after"] == "20" and refused.headers["retry-after-ms"] == "20000"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.headers["x-ratelimit-reset-requests"] == "1m0s"
        assert limiter.admit(10, now=20.0).allowed

    def test_tpm_counts_prompt_plus_max_tokens(self) -> None:
        """TPM reserves prompt + max_tokens at admission; the remaining-tokens header shows it."""
        limiter = RateLimiter(RateLimits(tpm=6000), now=0.0)
        first = limiter.admit(1000 + 4000, now=0.0)
        assert first.allowed and first.headers["x-ratelimit-remaining-tokens"] == "1000"
        assert first.headers["x-ratelimit-reset-tokens"] == "50s"
        refused = limiter.admit(2000, now=0.0)
        assert not refused.allowed and refused.limit_type == "tokens"
        assert refused.retry_after_s == pytest.approx(10.0)  # 1000 missing tokens at 100 tokens/s

    def test_a_request_larger_than_the_tpm_limit_is_refused_without_retry_after(self) -> None:
        """A request that could never fit is refused with OpenAI's 'Request too large' and no retry-after."""
        limiter = RateLimiter(RateLimits(tpm=1000), now=0.0)
        refused = limiter.admit(5000, now=0.0)
        assert not refused.allowed and refused.retry_after_s is None and "retry-after" not in refused.headers
        assert refused.message is not None and "Request too large" in refused.message


def req(max_tokens: int | None = None) -> ModelRequest:
    return ModelRequest(model="sim-model", messages=(Message("user", "hello"),), max_tokens=max_tokens)


class TestOverHTTP:
    async def test_rpm_429_reaches_the_transport_as_rate_limited_with_retry_after(self) -> None:
        """Successes carry x-ratelimit-* headers; the request over the RPM limit raises RateLimited
        with the server's retry-after."""
        async with SimServer(SimConfig(rate_limits=RateLimits(rpm=2))) as sim:
            transport = OpenAITransport(sim.base_url)
            first = await transport.complete(req())
            second = await transport.complete(req())
            with pytest.raises(RateLimited) as raised:
                await transport.complete(req())
            await transport.aclose()
        assert first.rate_limit is not None and first.rate_limit.limit_requests == 2
        assert first.rate_limit.remaining_requests == 1
        assert second.rate_limit is not None and second.rate_limit.remaining_requests == 0
        assert raised.value.status_code == 429
        assert raised.value.retry_after == pytest.approx(30.0, abs=0.5)
        assert [e.outcome for e in sim.log.by_arrival()] == ["ok", "ok", "rate_limited"]

    async def test_tpm_429_has_openai_headers_and_error_body(self) -> None:
        """A TPM refusal is a 429 with retry-after, retry-after-ms, x-ratelimit-* and an OpenAI error body."""
        async with SimServer(SimConfig(rate_limits=RateLimits(rpm=100, tpm=1000))) as sim:
            body = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 900}
            async with httpx.AsyncClient(base_url=sim.base_url) as client:
                ok = await client.post("/chat/completions", json=body)
                refused = await client.post("/chat/completions", json=body)
        assert ok.status_code == 200
        info = parse_rate_limit_headers(ok.headers)
        assert info is not None and info.limit_tokens == 1000 and info.limit_requests == 100
        assert refused.status_code == 429
        for name in (
            "retry-after",
            "retry-after-ms",
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
            "x-ratelimit-reset-requests",
        ):
            assert name in refused.headers, name
        error = refused.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "tokens"
        assert "tokens per min (TPM)" in error["message"]
