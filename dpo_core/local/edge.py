"""The ASGI edge of the local server: API key, injected faults, and a body cap that counts real bytes.

A `Content-Length` header is only a claim: chunked uploads have none and a zstd body of 32 KB can grow to
1 GiB, so the body is read here while counting, decompressed while counting, and handed to the routes whole.
Decoding a body costs a multiple of its size in memory and, for JSON and protobuf alike, one C call that holds
the GIL: so JSON bodies (no valid one is near a megabyte) have their own small cap, only `forward_backward`'s
protobuf gets the large one, and at most `max_large_bodies` bodies over LARGE_BODY_BYTES are read and decoded
at a time (the others wait their turn; docs/local-server.md gives the memory this bounds).
"""

from __future__ import annotations

import asyncio
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
PROTOBUF_ROUTES = ("/api/v1/forward_backward",)  # the only bodies that are not JSON
LARGE_BODY_BYTES = 256 * 1024  # bodies past this take a turn at the large-body gate
LARGE_BODY_WAIT_S = 30.0  # then 429: the SDK backs off and sends it again


def user_error_reply(exc: UserError, status_code: int | None = None) -> JSONResponse:
    content = {"error": str(exc), "category": "user"}
    if isinstance(exc, WireError):
        content["field"] = exc.field
    return JSONResponse(content, status_code=status_code or exc.status, headers=_NOT_RETRIED)


SIGNED_DOWNLOAD_PREFIX = "/api/v1/external_weights_download/"


class EdgeGuard:
    """The ASGI edge: API key, injected faults, and the body cap counted on the bytes themselves.

    The body is read here, before any route: chunked uploads have no Content-Length to trust, and a zstd body
    is decompressed while counting, so neither gets past `max_body_bytes`. Routes see the decompressed body. Any
    exception a route lets through becomes a JSON 500 here, so the kept-alive connection stays usable.
    """

    def __init__(self, app: Any, api_key: str, max_body_bytes: int, inject_fault: Callable[[str], Any],
                 max_json_body_bytes: int | None = None, max_large_bodies: int = 2):
        self.app, self.api_key, self.max_body_bytes, self.inject_fault = app, api_key, max_body_bytes, inject_fault
        self.max_json_body_bytes = max_json_body_bytes or max_body_bytes  # both caps apply to a JSON body
        self.max_large_bodies = max_large_bodies
        self._large_bodies = asyncio.Semaphore(max_large_bodies)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        # Signed download URLs carry no key (a plain GET, as from Tinker's storage): their route checks the signature.
        if headers.get("x-api-key") != self.api_key and not scope["path"].startswith(SIGNED_DOWNLOAD_PREFIX):
            reply = JSONResponse({"error": "missing or wrong API key (X-API-Key)", "category": "user"}, 401)
            return await reply(scope, receive, send)
        fault = self.inject_fault(scope["path"])  # before reading anything: a retry never repeats a side effect
        if fault is not None:
            return await fault(scope, receive, send)
        gate: list[asyncio.Semaphore] = []  # holds the large-body gate once taken, until the route has answered
        try:
            try:
                body = await self._read_body(headers, receive, scope["path"], gate)
            except UserError as exc:  # too large, or an encoding we cannot read: the rest of the body is unread
                reply = user_error_reply(exc)
                reply.headers["connection"] = "close"
                return await reply(scope, receive, send)
            except _Busy as exc:
                reply = JSONResponse({"error": str(exc), "category": "server"}, 429, headers={"Retry-After": "1"})
                reply.headers["connection"] = "close"
                return await reply(scope, receive, send)
            await self._call(scope, receive, send, headers, body)
        finally:
            for semaphore in gate:
                semaphore.release()

    async def _call(self, scope: dict, receive: Callable, send: Callable, headers: Headers,
                    body: bytes | None) -> None:
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

    async def _read_body(self, headers: Headers, receive: Callable, path: str,
                         gate: list[asyncio.Semaphore]) -> bytes | None:
        if path in PROTOBUF_ROUTES or self.max_body_bytes <= self.max_json_body_bytes:
            cap, setting = self.max_body_bytes, "DPO_LOCAL_MAX_BODY_BYTES"
        else:
            cap, setting = self.max_json_body_bytes, "DPO_LOCAL_MAX_JSON_BODY_BYTES"
        too_large = f"request body over {cap} bytes ({setting})"
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            if int(length) <= self.max_body_bytes:  # over the JSON cap only: drain it, so the client reads the 413
                await self._drain(receive, self.max_body_bytes)
            raise BodyTooLarge(too_large)
        if length is not None and length.isdigit() and int(length) > LARGE_BODY_BYTES:
            await self._enter_gate(gate)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                if cap < self.max_body_bytes and message.get("more_body"):
                    await self._drain(receive, self.max_body_bytes - size)
                raise BodyTooLarge(too_large)
            if size > LARGE_BODY_BYTES and not gate:  # a chunked upload has no length to tell beforehand
                await self._enter_gate(gate)
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        # Joining 64 MB took 0.1-0.2 s on a loaded machine: on a worker thread, where the copy lets the GIL go.
        body = await asyncio.to_thread(b"".join, chunks) if gate else b"".join(chunks)
        encoding = headers.get("content-encoding", "identity")
        if encoding.strip().lower() != "identity":
            if not gate:
                await self._enter_gate(gate)
            body = protocol.decompress_capped(body, encoding, cap)
        return body

    @staticmethod
    async def _drain(receive: Callable, limit: int) -> None:
        """Read and discard up to `limit` more bytes of a body that is refused for the JSON cap (a parse-memory
        bound, not a transfer bound): a reply sent while the client is still uploading is often lost to a
        connection reset, and the client would see a dropped connection instead of the 413 naming the setting.
        Nothing is kept, so memory stays flat; past the overall body cap the refusal is immediate as before."""
        size = 0
        while size <= limit:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                return

    async def _enter_gate(self, gate: list[asyncio.Semaphore]) -> None:
        try:
            await asyncio.wait_for(self._large_bodies.acquire(), LARGE_BODY_WAIT_S)
        except asyncio.TimeoutError:
            raise _Busy(f"the server is reading {self.max_large_bodies} large request bodies already "
                        "(DPO_LOCAL_MAX_LARGE_BODIES): send it again shortly") from None
        gate.append(self._large_bodies)


class _Busy(Exception):
    """The large-body gate stayed full: answered 429, which the SDK backs off from and retries."""
