"""Headers that tell a browser what this service's responses may do, on every response.

The dashboard keeps a person's API key in the tab's sessionStorage, so a script injected into
any page of this origin could read it. Everything it shows is inserted as text, never as HTML,
and the study report's HTML escapes every value; the policy is the second line: scripts only
from this origin's own files (no inline script, no eval), no plugins, no framing (clickjacking)
and no <base> that could redirect the page's relative URLs. Inline styles stay allowed: the
dashboard sizes its bars and the report styles its table with them, and a style cannot read
the key.
"""

from starlette.datastructures import MutableHeaders
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
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    # A JSON error is never run as a script or rendered as a page, whatever a browser guesses.
    "X-Content-Type-Options": "nosniff",
    # The dashboard's URLs name jobs and studies; a link out of it need not tell where from.
    "Referrer-Policy": "no-referrer",
}


class SecurityHeaders:
    """Pure ASGI: sets the headers on each response's start, leaving its body alone (a stream
    or a checkpoint download passes through untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)
