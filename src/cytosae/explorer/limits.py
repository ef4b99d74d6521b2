"""Request/response guards: refuse oversized bodies before they are parsed or spooled to disk; add
security headers to every response.

Body limit:

FastAPI parses multipart bodies before the handler runs, so a size check in the
handler comes too late: this ASGI middleware answers 413 from the Content-Length
header, and counts the bytes of chunked bodies as they arrive.
"""
from __future__ import annotations

import json


class BodyLimit:
    def __init__(self, app, max_bytes: int, overhead: int = 64 * 1024) -> None:
        self.app = app
        self.limit = max_bytes + overhead  # multipart boundaries and headers around the file

    async def _reject(self, send) -> None:
        body = json.dumps({"detail": f"request body is larger than the upload limit of {self.limit} bytes "
                                     "(including multipart overhead)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._reject(send)
        seen = 0
        state = {"started": False, "rejected": False}

        async def counted_receive():
            nonlocal seen
            if state["rejected"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    # answer now and tell the app the client went away, so nothing more is read or parsed
                    if not state["started"]:
                        state["started"] = state["rejected"] = True
                        await self._reject(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if state["rejected"]:
                return  # the 413 has been sent; drop whatever the app answers to the disconnect
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not state["rejected"]:
                raise


SECURITY_HEADERS = [
    # everything the pages need is served from here; no inline script, nothing from elsewhere
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; script-src 'self'; "
                                 b"style-src 'self'; connect-src 'self'; object-src 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class SecurityHeaders:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + SECURITY_HEADERS}
            await send(message)

        await self.app(scope, receive, with_headers)
