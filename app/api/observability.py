"""The request middleware: a request id on every line and response, and the request metrics."""

import time

from starlette.datastructures import MutableHeaders
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.observability import metrics
from app.core.observability.logs import accept_request_id, request_id_var

REQUEST_ID_HEADER = "X-Request-ID"
# Paths that matched no route share one label, so a scan of random URLs cannot grow the series.
UNMATCHED = "<unmatched>"


class RequestObservability:
    """Pure ASGI (no BaseHTTPMiddleware): a status read pays a counter and a histogram, no task.

    Requests are counted by route *template* (/v1/jobs/{job_id}), never by raw path, so the
    number of series stays bounded by the number of routes.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        header = next((value for name, value in scope["headers"] if name == b"x-request-id"), None)
        request_id = accept_request_id(header.decode("latin-1") if header is not None else None)
        token = request_id_var.set(request_id)
        status = 500  # what the client gets if the application raises before answering

        async def send_with_request_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_request_id)
        finally:
            route: BaseRoute | None = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED
            method = scope["method"]
            metrics.HTTP_REQUESTS.labels(method, template, str(status)).inc()
            metrics.HTTP_REQUEST_SECONDS.labels(method, template).observe(
                time.perf_counter() - started
            )
            request_id_var.reset(token)
