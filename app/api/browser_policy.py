"""What a browser may do with the service: security headers on every response, and which other
origins' pages may call the API (CORS, off unless TRAINSVC_CORS_ORIGINS names them).

The dashboard keeps a person's API key in the tab's sessionStorage, so a script injected into
any page of this origin could read it. Everything it shows is inserted as text, never as HTML,
and the study report's HTML escapes every value; the policy is the second line: scripts only
from this origin's own files (no inline script, no eval), no plugins, no framing (clickjacking)
and no <base> that could redirect the page's relative URLs. Inline styles stay allowed: the
dashboard sizes its bars and the report styles its table with them, and a style cannot read
the key. FastAPI's API docs pages load from a CDN and get a policy of their own.

Another origin's page (a team's own dashboard) may call the API once the operator lists that
origin. A key travels in the Authorization header, never in a cookie, so no credentials mode
is needed, and a listed page can do only what the key it sends allows.
"""

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
# FastAPI's API docs (/docs, /redoc) are pages of its own: Swagger UI and ReDoc from a CDN,
# started by an inline script, with fonts and an icon from elsewhere. They hold no data but
# the OpenAPI document, so they get what they need, and every other page keeps the strict one.
DOCS_CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net",
        "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com",
        "font-src 'self' https://fonts.gstatic.com",
        "img-src 'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly",
        "worker-src 'self' blob:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    # A JSON error is never run as a script or rendered as a page, whatever a browser guesses.
    "X-Content-Type-Options": "nosniff",
    # The dashboard's URLs name jobs and studies; a link out of it need not tell where from.
    "Referrer-Policy": "no-referrer",
}
DOCS_HEADERS = {**SECURITY_HEADERS, "Content-Security-Policy": DOCS_CONTENT_SECURITY_POLICY}

# What a page on a listed origin may send, and read back: the request headers the API takes,
# and the response headers it sets (a browser shows a script only a few by default).
CORS_METHODS = ["GET", "POST", "DELETE"]
CORS_REQUEST_HEADERS = [
    "Authorization",
    "Content-Type",
    "Idempotency-Key",
    "If-None-Match",
    "Last-Event-ID",
    "X-Request-ID",
]
CORS_RESPONSE_HEADERS = [
    "Allow",
    "Content-Disposition",
    "ETag",
    "Retry-After",
    "WWW-Authenticate",
    "X-Request-ID",
]
# How long a browser may reuse a preflight's answer before asking again.
CORS_MAX_AGE_SECONDS = 600


class SecurityHeaders:
    """Pure ASGI: sets the headers on each response's start, leaving its body alone (a stream
    or a checkpoint download passes through untouched); `docs_paths` get the docs' policy."""

    def __init__(self, app: ASGIApp, docs_paths: frozenset[str]) -> None:
        self.app = app
        self.docs_paths = docs_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chosen = DOCS_HEADERS if scope["path"] in self.docs_paths else SECURITY_HEADERS

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(chosen)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install_browser_policy(app: FastAPI, cors_origins: list[str]) -> None:
    """The security headers on every response, and CORS for the listed origins, if any.
    Outside the body limit and the error handlers, so that a page may read a 413 or a 429."""
    docs = (app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url)
    app.add_middleware(SecurityHeaders, docs_paths=frozenset(p for p in docs if p))
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors_origins,
            allow_methods=CORS_METHODS,
            allow_headers=CORS_REQUEST_HEADERS,
            expose_headers=CORS_RESPONSE_HEADERS,
            max_age=CORS_MAX_AGE_SECONDS,
        )
