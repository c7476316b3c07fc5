"""The ASGI edge of the local server: API key, injected faults, and a body cap that counts real bytes.

A `Content-Length` header is only a claim: chunked uploads have none and a zstd body of 32 KB can grow to
1 GiB, so the body is read here while counting, decompressed while counting, and handed to the routes whole.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers

from dpo_core.local import protocol
from dpo_core.local.protocol import BodyTooLarge
from dpo_core.local.validation import UserError, WireError

log = logging.getLogger("dpo_core.local")

_NOT_RETRIED = {"x-should-retry": "false"}  # a client error: the SDK must not resend it


def user_error_reply(exc: UserError, status_code: int | None = None) -> JSONResponse:
    content = {"error": str(exc), "category": "user"}
    if isinstance(exc, WireError):
        content["field"] = exc.field
    return JSONResponse(content, status_code=status_code or exc.status, headers=_NOT_RETRIED)


class EdgeGuard:
    """The ASGI edge: API key, injected faults, and the body cap counted on the bytes themselves.

    The body is read here, before any route: chunked uploads have no Content-Length to trust, and a zstd body
    is decompressed while counting, so neither gets past `max_body_bytes`. Routes see the decompressed body. Any
    exception a route lets through becomes a JSON 500 here, so the kept-alive connection stays usable.
    """

    def __init__(self, app: Any, api_key: str, max_body_bytes: int, inject_fault: Callable[[str], Any]):
        self.app, self.api_key, self.max_body_bytes, self.inject_fault = app, api_key, max_body_bytes, inject_fault

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if headers.get("x-api-key") != self.api_key:
            reply = JSONResponse({"error": "missing or wrong API key (X-API-Key)", "category": "user"}, 401)
            return await reply(scope, receive, send)
        fault = self.inject_fault(scope["path"])  # before reading anything: a retry never repeats a side effect
        if fault is not None:
            return await fault(scope, receive, send)
        try:
            body = await self._read_body(headers, receive)
        except UserError as exc:  # too large, or an encoding we cannot read: the rest of the body is unread
            reply = user_error_reply(exc)
            reply.headers["connection"] = "close"
            return await reply(scope, receive, send)
        if body is None:  # the client went away
            return
        if "content-encoding" in headers:
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"]
                                          if k not in (b"content-encoding", b"content-length")]
                     + [(b"content-length", str(len(body)).encode())]}
        delivered = False

        async def replay() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        started = False

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay, tracked_send)
        except Exception as exc:
            log.error("unhandled error on %s: %s", scope["path"], "".join(traceback.format_exception(exc)))
            if started:
                raise
            reply = JSONResponse({"error": f"internal error: {type(exc).__name__}", "category": "server"}, 500)
            await reply(scope, receive, send)

    async def _read_body(self, headers: Headers, receive: Callable) -> bytes | None:
        cap = self.max_body_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            raise BodyTooLarge(f"request body over {cap} bytes (DPO_LOCAL_MAX_BODY_BYTES)")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                raise BodyTooLarge(f"request body over {cap} bytes (DPO_LOCAL_MAX_BODY_BYTES)")
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        encoding = headers.get("content-encoding", "identity")
        if encoding.strip().lower() != "identity":
            body = protocol.decompress_capped(body, encoding, cap)
        return body
