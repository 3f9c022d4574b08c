"""Uploaded contexts: `POST /v1/files` streams the request body to disk as it arrives, so a
40 MB context is never JSON-escaped into a chat message nor held twice in memory; a body
over the size limit is refused with 413 as soon as it crosses it (or at once, from its
`Content-Length`), and the partial file is removed."""

from __future__ import annotations

import json
import mmap
import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio

from .._context import Context
from ._errors import APIError

__all__ = ["FileStore"]


def _valid_id(file_id: str) -> bool:
    return file_id.startswith("file-") and file_id[5:].isalnum() and len(file_id) <= 64


def _no_file(file_id: str) -> APIError:
    return APIError(404, f"no file {file_id!r}", param="file_id")


def _owned_record(meta: Path, file_id: str, tenant: str) -> dict[str, Any]:
    """The file's metadata, if `tenant` owns it; another tenant's file does not exist for you."""
    try:
        record: dict[str, Any] = json.loads(meta.read_text())
    except FileNotFoundError:
        raise _no_file(file_id) from None
    if record.get("tenant") != tenant:
        raise _no_file(file_id)
    return record


def _read_text(path: Path) -> str:
    """The file's UTF-8 text, decoded from a read-only map of it: the bytes decoded are the
    page cache's, not a second copy in this process's own memory beside the str (reading
    the file first would hold both, 80 MB for a 40 MB file, until the decode ends)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return ""  # an empty file cannot be mapped
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return str(mapped, "utf-8")


class FileStore:
    """Files under `root/`, one data file and one JSON metadata file each, per tenant."""

    def __init__(self, root: Path, *, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        root.mkdir(parents=True, exist_ok=True)

    def _paths(self, file_id: str) -> tuple[Path, Path]:
        return self.root / f"{file_id}.data", self.root / f"{file_id}.json"

    def _asked_paths(self, file_id: str) -> tuple[Path, Path]:
        """`_paths` of an id a client gave: one not of our making names no file."""
        if not _valid_id(file_id):
            raise _no_file(file_id)
        return self._paths(file_id)

    async def save(
        self, chunks: AsyncIterator[bytes], *, tenant: str, filename: str, declared: int | None
    ) -> dict[str, Any]:
        if declared is not None and declared > self.max_bytes:
            raise APIError(413, f"the file is {declared:,} bytes; the limit is {self.max_bytes:,} bytes")
        file_id = "file-" + secrets.token_hex(12)
        data, meta = self._paths(file_id)
        size = 0
        try:
            async with await anyio.open_file(data, "wb") as out:
                async for piece in chunks:
                    size += len(piece)
                    if size > self.max_bytes:
                        raise APIError(413, f"the file is over the limit of {self.max_bytes:,} bytes")
                    await out.write(piece)
            if size == 0:
                raise APIError(
                    400,
                    "the file is empty: send the context as the request body "
                    "(curl --data-binary @FILE, or the bytes as content)",
                )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(lambda: data.unlink(missing_ok=True))
            raise
        record = {
            "id": file_id,
            "object": "file",
            "bytes": size,
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": "rlm-context",
            "tenant": tenant,
        }
        await anyio.Path(meta).write_text(json.dumps(record))
        return record

    async def info(self, file_id: str, *, tenant: str) -> dict[str, Any]:
        return await anyio.to_thread.run_sync(_owned_record, self._asked_paths(file_id)[1], file_id, tenant)

    async def load(self, file_id: str, *, tenant: str, fmt: str) -> Context:
        """The file as a context: its UTF-8 text, or (format "json") a list, dict or str."""
        data, meta = self._asked_paths(file_id)

        def read() -> Context:
            # The owner's check and the read in one trip to a thread: each trip is a pass
            # through a busy event loop, and a burst of queries starts with one each.
            _owned_record(meta, file_id, tenant)
            try:
                text = _read_text(data)
                if fmt != "json":
                    return text
                value = json.loads(text)
            except UnicodeDecodeError:
                raise APIError(400, f"file {file_id} is not UTF-8 text", param="file_id") from None
            except ValueError as exc:
                raise APIError(
                    400, f"file {file_id} is not a usable JSON context: {exc}", param="file_id"
                ) from None
            if not isinstance(value, (str, list, dict)):
                raise APIError(
                    400,
                    f"file {file_id} is not a usable JSON context: holds a JSON {type(value).__name__}; "
                    "use a list, an object or a string",
                    param="file_id",
                )
            return value

        return await anyio.to_thread.run_sync(read)

    async def delete(self, file_id: str, *, tenant: str) -> None:
        await self.info(file_id, tenant=tenant)
        for path in self._paths(file_id):
            await anyio.to_thread.run_sync(os.unlink, path)
