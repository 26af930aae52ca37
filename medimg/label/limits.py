"""A size limit on request bodies (uploads) of the MONAI Label server, checked as the bytes arrive.

A request whose ``Content-Length`` is over the limit is answered 413 before its body is read. A
body without one (chunked) is counted while the app reads it, and refused with 413 the moment it
passes the limit, so an endless upload cannot fill the disk or the memory. (FastAPI turns the
interrupted read into its own 400 "error parsing the body"; that answer is replaced by the 413.)
"""

from __future__ import annotations

from typing import Any

UPLOAD_ENV = "MEDIMG_LABEL_MAX_UPLOAD_MB"
DEFAULT_MAX_UPLOAD_MB = 2048


class _TooLarge(Exception):
    """Raised from ``receive`` when the body passes the limit."""


class BodyLimitMiddleware:
    """Pure ASGI middleware: 413 for a request body over ``max_bytes``.

    Args:
        app: the ASGI app to protect.
        max_bytes: the largest body accepted.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        """Pass the request on, counting its body; answer 413 when it is too large."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        received, started, exceeded = 0, False, False

        async def counted() -> dict:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _TooLarge
            return message

        async def tracked(message: dict) -> None:
            nonlocal started
            if exceeded:  # the app turned the interrupted read into its own error: answer 413 instead
                if not started and message["type"] == "http.response.start":
                    started = True
                    await self._refuse(scope, receive, send)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        from starlette.responses import JSONResponse

        mb = self.max_bytes / 2**20
        response = JSONResponse({"detail": f"request body over the server's upload limit ({mb:g} MB)"},
                                status_code=413, headers={"Connection": "close"})
        await response(scope, receive, send)
