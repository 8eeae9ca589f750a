"""Request size limits, enforced before a handler runs: a request head (line and headers) over
its limit is a 431, a body over its limit a 413, before the body is read."""

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HeadSizeLimit:
    """Refuse a request whose line and headers exceed `limit` bytes.

    uvicorn's h11 bounds only a head still arriving (h11_max_incomplete_event_size): a
    70 KB head sent in one write was parsed and served. The head is in memory by now either
    way; this makes the limit hold whatever the client's writes, with an answer in our shape.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and head_bytes(scope) > self.limit:
            await _refuse(
                send,
                431,
                "headers_too_large",
                f"request line and headers over the limit of {self.limit} bytes",
            )
            return
        await self.app(scope, receive, send)


def head_bytes(scope: Scope) -> int:
    """The size of the request head as sent: "METHOD target HTTP/1.1\\r\\n", "name: value\\r\\n"
    per header, and the blank line."""
    target = len(scope.get("raw_path") or scope["path"].encode()) + len(scope["query_string"])
    line = len(scope["method"]) + 1 + target + 1 + len(b"HTTP/1.1\r\n") + 1
    return line + sum(len(name) + len(value) + 4 for name, value in scope["headers"]) + 2


class BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    """Refuse bodies over `default_limit` bytes (over `upload_limit` on upload paths).

    A declared Content-Length is checked up front. A chunked body (no Content-Length) is
    counted as it streams in: the message that crosses the limit is never handed to the app;
    the 413 is sent there and then, and the app's own reaction to the body that broke off
    (FastAPI answers a 400 "There was an error parsing the body") is dropped, so the client
    sees the same 413 either way. Nothing is buffered here: the limit holds before memory grows.
    """

    def __init__(
        self, app: ASGIApp, default_limit: int, upload_limit: int, upload_paths: tuple[str, ...]
    ) -> None:
        self.app = app
        self.default_limit = default_limit
        self.upload_limit = upload_limit
        self.upload_paths = upload_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        limit = self.upload_limit if path.startswith(self.upload_paths) else self.default_limit
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _reject(send, limit)
            return
        received = 0
        response_started = False
        rejected = False

        async def counting_receive() -> Message:
            nonlocal received, rejected
            if rejected:
                raise BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if not response_started:
                        rejected = True
                        await _reject(send, limit)
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if rejected:
                return  # the 413 has been sent; whatever the app makes of the cut body is not
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except BodyTooLarge:
            if not rejected:
                raise


async def _reject(send: Send, limit: int) -> None:
    await _refuse(send, 413, "payload_too_large", f"request body over the limit of {limit} bytes")


async def _refuse(send: Send, status: int, error: str, detail: str) -> None:
    body = json.dumps({"error": error, "detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                # The rest of the body is never read: the connection cannot carry another request.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
