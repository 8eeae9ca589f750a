"""A team's own dashboard, served from another origin, calls the API from a real browser: where
TRAINSVC_CORS_ORIGINS lists its origin it submits with a key and reads the answer's headers;
where not, the browser keeps the answer from it. (The headers alone: test_browser_policy.py.)"""

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from app.core.keys import create_key
from app.core.migrate import upgrade
from tests.support.processes import Processes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

# A page as a team would write it: fetch() with the key in a header, a JSON body and an
# Idempotency-Key (so the browser asks the API first: a preflight), then a read of the job
# whose ETag it keeps for its next poll. It writes what happened into <body data-outcome>.
PAGE = b"""<!doctype html><html><body><script>
const params = new URLSearchParams(location.search);
const api = params.get("api"), key = params.get("key");
(async () => {
  try {
    const headers = {"Authorization": `Bearer ${key}`};
    const created = await fetch(`${api}/v1/jobs`, {
      method: "POST",
      headers: {...headers, "Content-Type": "application/json", "Idempotency-Key": "team-1"},
      body: JSON.stringify({dataset: {name: "digits"}, epochs: 1}),
    });
    const job = await created.json();
    const read = await fetch(`${api}/v1/jobs/${job.id}`, {headers});
    document.body.dataset.outcome = JSON.stringify({
      created: created.status,
      requestId: created.headers.get("X-Request-ID"),
      read: read.status,
      status: (await read.json()).status,
      etag: read.headers.get("ETag"),
    });
  } catch (error) {
    document.body.dataset.outcome = JSON.stringify({blocked: String(error)});
  }
})();
</script></body></html>"""


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def page_origins() -> Iterator[tuple[str, str]]:
    """The same page served on two ports: two origins, one to list and one not."""
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), _Page) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tuple(f"http://127.0.0.1:{s.server_address[1]}" for s in servers)  # type: ignore[misc]
    for server in servers:
        server.shutdown()
        server.server_close()


def _outcome(chromium: Any, page_url: str) -> dict[str, Any]:
    context = chromium.new_context()
    try:
        page = context.new_page()
        page.goto(page_url)
        page.wait_for_selector("body[data-outcome]", state="attached", timeout=30_000)
        outcome: dict[str, Any] = json.loads(page.get_attribute("body", "data-outcome"))
        return outcome
    finally:
        context.close()


def test_a_listed_origins_page_calls_the_api_and_another_is_kept_out(
    processes: Processes,
    chromium: Any,
    page_origins: tuple[str, str],
    tmp_path: Path,
    redis_url: str,
) -> None:
    listed, unlisted = page_origins
    database_url = f"sqlite:///{tmp_path / 'trainsvc.db'}"
    upgrade(database_url)
    engine = create_engine(database_url)
    with Session(engine) as session:
        _, key = create_key(session, "team")
        session.commit()
    engine.dispose()
    processes.env.update(
        {
            "TRAINSVC_DATABASE_URL": database_url,
            "TRAINSVC_BROKER_URL": redis_url,
            "TRAINSVC_AUTH": "on",
            "TRAINSVC_CORS_ORIGINS": json.dumps([listed]),
        }
    )
    api = processes.api("serve")
    query = urlencode({"api": api, "key": key})

    allowed = _outcome(chromium, f"{listed}/?{query}")
    assert allowed["created"] == 201
    assert allowed["requestId"]  # a header the page may read only because it is exposed
    assert allowed["read"] == 200
    assert allowed["status"] == "queued"
    assert allowed["etag"].startswith('"')

    kept_out = _outcome(chromium, f"{unlisted}/?{query}")
    assert kept_out == {"blocked": "TypeError: Failed to fetch"}
