"""The HTTP face: a Starlette app whose routes translate requests into `Service` calls.

    GET    /healthz                       liveness and state (no key needed)
    GET    /metrics                       Prometheus text (no key needed; loopback or a scraper)
    GET    /v1/models                     the profiles
    POST   /v1/chat/completions           OpenAI-compatible; stream=true sends SSE
    POST   /v1/files                      the body, streamed to disk, becomes a context file
    GET    /v1/files/{id}   DELETE ...
    POST   /v1/rlm/jobs                   202 + the job; GET /v1/rlm/jobs/{id}; DELETE cancels
    GET    /v1/rlm/jobs/{id}/events       SSE progress, resumable with Last-Event-ID

Every error is OpenAI's error body with the status that says what to do (`_errors`).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ._adapter import openai_usage
from ._auth import KeyRing
from ._errors import APIError, error_body
from ._jobs import Gap, Job
from ._openai import (
    ChatRequest,
    ContextSpec,
    chunk,
    completion_body,
    new_completion_id,
    parse_chat_request,
    parse_rlm_options,
    split_answer,
)
from ._service import Service

__all__ = ["create_app"]

Handler = Callable[[Request], Awaitable[Response]]


def _last_event_id(header: str | None) -> int:
    """The event a reconnecting SSE client last received (0: none, start from the first)."""
    if not header:
        return 0
    if not (header.isascii() and header.isdigit()):
        raise APIError(
            400,
            f"Last-Event-ID must be the id of an event this stream sent (a whole number), not {header[:40]!r}; "
            "reconnect without it to start from the first event",
        )
    return int(header)


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.status, exc.message, param=exc.param, code=exc.code),
        status_code=exc.status,
        headers=exc.headers,
    )


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(
            413,
            f"the body is {int(declared):,} bytes; the limit is {limit:,} (upload large contexts "
            "with POST /v1/files and name the file in rlm.file_id)",
        )
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise APIError(
                413,
                f"the body is over the limit of {limit:,} bytes (upload large contexts with "
                "POST /v1/files and name the file in rlm.file_id)",
            )
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}") from None


async def _until_disconnect(request: Request, job: Job) -> None:
    """Cancel the job when the client goes away before its answer (the body is read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel("the client disconnected")
            return


def create_app(service: Service, keys: KeyRing) -> Starlette:
    """The app for a service that the caller runs (`async with service:`) for its lifetime."""

    def authed(handler: Callable[[Request, str], Awaitable[Response]]) -> Handler:
        async def wrapped(request: Request) -> Response:
            try:
                tenant = keys.authenticate(request.headers.get("authorization"))
                if tenant is None:
                    raise APIError(
                        401,
                        "missing or wrong API key: send Authorization: Bearer <key>",
                        headers={"www-authenticate": "Bearer"},
                    )
                return await handler(request, tenant.name)
            except APIError as exc:
                return _error(exc)

        return wrapped

    # ------------------------------------------------------------------ open routes
    async def healthz(request: Request) -> Response:
        return JSONResponse(
            {
                "status": "draining" if service.draining else "ok",
                "running": service.admission.running,
                "queued": service.admission.queued,
                "profiles": sorted(service.rlms),
                "uptime_s": round(time.time() - service.started_at, 3),
            },
            status_code=503 if service.draining else 200,
        )

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------------ models
    async def models(request: Request, tenant: str) -> Response:
        created = int(service.started_at)
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": name, "object": "model", "created": created, "owned_by": "rlm-async"}
                    for name in service.rlms
                ],
            }
        )

    # ------------------------------------------------------------------ chat completions
    async def chat_completions(request: Request, tenant: str) -> Response:
        body = await _read_json(request, service.config.max_body_bytes)
        chat = parse_chat_request(body)
        plan = service.plan(chat.model, chat.context, chat.query, chat.options)
        job = service.start(plan, tenant=tenant, kind="chat", progress=chat.stream)
        completion_id = new_completion_id()
        if chat.stream:
            return EventSourceResponse(_stream(job, chat, completion_id), ping=15)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_until_disconnect, request, job)
            await job.wait()
            tg.cancel_scope.cancel()
        return _completion_response(job, chat.model, completion_id)

    def _completion_response(job: Job, model: str, completion_id: str) -> Response:
        result = job.result
        if job.refusal is not None:
            raise job.refusal
        if job.state == "failed" or result is None:
            raise APIError(500 if job.state == "failed" else 499, f"the query did not finish: {job.error}")
        if result["status"] == "error" and result["answer"] is None:
            raise APIError(502, f"the model server failed: {result['detail']}", code="upstream_error")
        rlm = {**result, "job_id": job.id, "query_id": job.query_id}
        rlm.pop("answer", None)
        return JSONResponse(
            completion_body(
                completion_id=completion_id,
                model=model,
                answer=result["answer"] or "",
                usage=openai_usage(job.usage),
                rlm=rlm,
            )
        )

    async def _stream(job: Job, chat: ChatRequest, completion_id: str) -> AsyncIterator[ServerSentEvent]:
        created = int(time.time())
        mode = chat.options.progress
        try:
            first = chunk(
                completion_id=completion_id,
                model=chat.model,
                created=created,
                delta={"role": "assistant", "content": ""},
            )
            yield ServerSentEvent(data=json.dumps(first))
            async for item in job.follow():
                if mode == "none":
                    continue
                if isinstance(item, Gap):  # progress dropped before this stream sent it
                    record: dict[str, Any] = {"kind": "gap", **item.to_dict()}
                elif item[1] == "progress":
                    record = item[2]
                else:
                    continue
                if mode == "comments":
                    yield ServerSentEvent(comment="rlm.progress " + json.dumps(record))
                else:
                    yield ServerSentEvent(event="rlm.progress", data=json.dumps(record))
            result = job.result
            if job.refusal is not None:
                refusal = job.refusal
                yield ServerSentEvent(
                    data=json.dumps(error_body(refusal.status, refusal.message, param=refusal.param))
                )
                return
            if result is None or (result["status"] == "error" and result["answer"] is None):
                detail = job.error if result is None else f"the model server failed: {result['detail']}"
                yield ServerSentEvent(data=json.dumps(error_body(500, f"the query did not finish: {detail}")))
                return
            for piece in split_answer(result["answer"] or ""):
                yield ServerSentEvent(
                    data=json.dumps(
                        chunk(
                            completion_id=completion_id,
                            model=chat.model,
                            created=created,
                            delta={"content": piece},
                        )
                    )
                )
            usage = openai_usage(job.usage)
            rlm = {k: v for k, v in result.items() if k != "answer"} | {
                "job_id": job.id,
                "query_id": job.query_id,
            }
            finish = "stop" if result["status"] == "ok" else "length"
            yield ServerSentEvent(
                data=json.dumps(
                    chunk(
                        completion_id=completion_id,
                        model=chat.model,
                        created=created,
                        delta={},
                        finish_reason=finish,
                        usage=None if chat.include_usage else usage,
                        rlm=rlm,
                    )
                )
            )
            if chat.include_usage:  # OpenAI's shape: a last chunk with no choices and the usage
                yield ServerSentEvent(
                    data=json.dumps(
                        chunk(
                            completion_id=completion_id,
                            model=chat.model,
                            created=created,
                            delta=None,
                            usage=usage,
                        )
                    )
                )
            yield ServerSentEvent(data="[DONE]")
        finally:
            if not job.done:  # the client went away mid-stream: stop paying for it
                job.cancel("the client disconnected")

    # ------------------------------------------------------------------ files
    async def upload_file(request: Request, tenant: str) -> Response:
        files = service.files
        assert files is not None
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            raise APIError(
                415,
                "send the file as the raw request body (Content-Type: text/plain or "
                "application/octet-stream), not multipart: it is streamed to disk as it arrives",
            )
        declared = request.headers.get("content-length")
        record = await files.save(
            request.stream(),
            tenant=tenant,
            filename=request.query_params.get("filename", "context"),
            declared=int(declared) if declared and declared.isdigit() else None,
        )
        record.pop("tenant", None)
        return JSONResponse(record)

    async def get_file(request: Request, tenant: str) -> Response:
        assert service.files is not None
        record = await service.files.info(request.path_params["file_id"], tenant=tenant)
        record.pop("tenant", None)
        return JSONResponse(record)

    async def delete_file(request: Request, tenant: str) -> Response:
        assert service.files is not None
        file_id = request.path_params["file_id"]
        await service.files.delete(file_id, tenant=tenant)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    # ------------------------------------------------------------------ jobs
    async def create_job(request: Request, tenant: str) -> Response:
        body = await _read_json(request, service.config.max_body_bytes)
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model", "")
        if not isinstance(model, str):
            raise APIError(400, "model must be a string", param="model")
        options = parse_rlm_options({k: v for k, v in body.items() if k != "model"})
        if options.context is None:
            raise APIError(
                400, "a job needs a context (context, or file_id of an uploaded file)", param="context"
            )
        if not options.query:
            raise APIError(400, "a job needs a query", param="query")
        context: ContextSpec = options.context
        if context.file_id is not None:
            assert service.files is not None
            await service.files.info(context.file_id, tenant=tenant)  # 404 now, not later
        plan = service.plan(model, context, options.query, options)
        job = service.start(plan, tenant=tenant, kind="job")
        return JSONResponse(job.to_dict(), status_code=202, headers={"location": f"/v1/rlm/jobs/{job.id}"})

    async def get_job(request: Request, tenant: str) -> Response:
        return JSONResponse(await service.job_record(request.path_params["job_id"], tenant))

    async def cancel_job(request: Request, tenant: str) -> Response:
        job_id = request.path_params["job_id"]
        job = service.jobs.get(job_id)
        if job is None or job.tenant != tenant or job.kind != "job":
            return JSONResponse(await service.job_record(job_id, tenant))  # finished (or 404)
        job.cancel("cancelled by DELETE")
        with anyio.move_on_after(30):
            await job.wait()
        return JSONResponse(await service.job_record(job_id, tenant))

    async def job_events(request: Request, tenant: str) -> Response:
        job_id = request.path_params["job_id"]
        job = service.jobs.get(job_id)
        last = _last_event_id(request.headers.get("last-event-id"))
        if job is None or job.tenant != tenant or job.kind != "job":
            record = await service.job_record(job_id, tenant)  # from the store, or 404

            async def replay() -> AsyncIterator[ServerSentEvent]:
                yield ServerSentEvent(event="done", data=json.dumps(record))

            return EventSourceResponse(replay())

        if last > job.last_event_id:
            raise APIError(
                400,
                f"Last-Event-ID {last} is past the last event this job sent ({job.last_event_id}); "
                "resume from an id this stream sent, or reconnect without it to start from the first event",
            )

        async def feed() -> AsyncIterator[ServerSentEvent]:
            async for item in job.follow(last):
                if isinstance(item, Gap):  # dropped for newer ones before this client read them
                    yield ServerSentEvent(event="gap", data=json.dumps(item.to_dict()))
                else:
                    seq, name, data = item
                    yield ServerSentEvent(id=str(seq), event=name, data=json.dumps(data))

        return EventSourceResponse(feed(), ping=15)

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        message = exc.detail if isinstance(exc, HTTPException) else "internal error"
        return JSONResponse(
            error_body(status, f"{request.method} {request.url.path}: {message}"), status_code=status
        )

    routes = [
        Route("/healthz", healthz),
        Route("/metrics", metrics),
        Route("/v1/models", authed(models)),
        Route("/v1/chat/completions", authed(chat_completions), methods=["POST"]),
        Route("/v1/files", authed(upload_file), methods=["POST"]),
        Route("/v1/files/{file_id}", authed(get_file), methods=["GET"]),
        Route("/v1/files/{file_id}", authed(delete_file), methods=["DELETE"]),
        Route("/v1/rlm/jobs", authed(create_job), methods=["POST"]),
        Route("/v1/rlm/jobs/{job_id}", authed(get_job), methods=["GET"]),
        Route("/v1/rlm/jobs/{job_id}", authed(cancel_job), methods=["DELETE"]),
        Route("/v1/rlm/jobs/{job_id}/events", authed(job_events), methods=["GET"]),
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield

    return Starlette(routes=routes, exception_handlers={HTTPException: not_found}, lifespan=lifespan)
