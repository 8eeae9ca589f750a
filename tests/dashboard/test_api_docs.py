"""FastAPI's API docs (/docs, /redoc) still work under the service's Content-Security-Policy:
their CDN scripts and inline start-up script run, and the browser reports no violation.

There is no internet here, so the browser's requests to the CDN are answered by stand-ins that
do what the real bundles' entry points do (define SwaggerUIBundle, run the <redoc> element);
what is tested is the policy and the pages, not Swagger UI itself."""

import re
from pathlib import Path
from typing import Any

import pytest

from app.core.migrate import upgrade
from tests.support.processes import Processes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

STAND_INS = {
    "swagger-ui-bundle.js": """
        window.SwaggerUIBundle = function (config) {
          document.querySelector(config.dom_id).textContent = "swagger ui for " + config.url;
        };
        SwaggerUIBundle.presets = {apis: {}};
        SwaggerUIBundle.SwaggerUIStandalonePreset = {};
    """,
    "redoc.standalone.js": """
        const element = document.querySelector("redoc");
        element.textContent = "redoc for " + element.getAttribute("spec-url");
    """,
}


def _stand_in(route: Any) -> None:
    name = route.request.url.rsplit("/", 1)[-1]
    if name in STAND_INS:
        route.fulfill(status=200, content_type="text/javascript", body=STAND_INS[name])
    elif name.endswith(".css") or "css?" in name:
        route.fulfill(status=200, content_type="text/css", body="")
    else:
        route.fulfill(status=404, body="")


def test_the_api_docs_pages_run_under_their_policy(
    processes: Processes, chromium: Any, tmp_path: Path
) -> None:
    database_url = f"sqlite:///{tmp_path / 'trainsvc.db'}"
    upgrade(database_url)
    processes.env["TRAINSVC_DATABASE_URL"] = database_url
    url = processes.api("serve")
    context = chromium.new_context()
    violations: list[str] = []
    try:
        page = context.new_page()
        page.on(
            "console",
            lambda message: (
                violations.append(message.text)
                if "Content Security Policy" in message.text
                else None
            ),
        )
        page.route(
            re.compile(
                r"https://(cdn\.jsdelivr\.net|fonts\.googleapis\.com|fastapi\.tiangolo\.com)/.*"
            ),
            _stand_in,
        )
        page.goto(f"{url}/docs")
        page.wait_for_selector("text=swagger ui for /openapi.json")  # the inline script ran
        page.goto(f"{url}/redoc")
        page.wait_for_selector("text=redoc for /openapi.json")
    finally:
        context.close()
    assert violations == []
