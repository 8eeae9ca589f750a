"""Every answer a test receives must be one the OpenAPI document declares for its operation.

The schema fuzzer (tests/api/test_openapi_fuzz.py) checks what it can reach from the document
alone; the answers that need stored state (an idempotent replay, a study still running, a
quota spent) are reached by the feature tests. Their clients (`documented_client`, and the `client`
fixture made with it) record each response here and fail the test on any status its
operation does not declare.
"""

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.testclient import TestClient


class DeclaredStatuses:
    """Checks each response against the app's OpenAPI document."""

    def __init__(self, app: FastAPI) -> None:
        self._app = app
        self._paths: list[tuple[re.Pattern[str], int, dict[str, Any]]] | None = None
        self.undeclared: list[str] = []

    def _operations(self) -> list[tuple[re.Pattern[str], int, dict[str, Any]]]:
        """Each documented path as a pattern, with its number of parameters and operations."""
        if self._paths is None:
            self._paths = []
            for template, operations in self._app.openapi()["paths"].items():
                pattern = re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(template))
                self._paths.append((re.compile(pattern), template.count("{"), operations))
        return self._paths

    def _operation(self, method: str, path: str) -> dict[str, Any] | None:
        # /v1/studies/presets and /v1/studies/{study_id} both match; the literal one routes.
        matches = [
            (parameters, operations)
            for pattern, parameters, operations in self._operations()
            if pattern.fullmatch(path)
        ]
        if not matches:
            return None  # not a documented path: the dashboard's files, the docs, a 404
        operation: dict[str, Any] | None = min(matches, key=lambda match: match[0])[1].get(
            method.lower()
        )
        return operation  # None: a method the path lacks (the router's 405)

    def check(self, response: httpx.Response) -> None:
        request = response.request
        operation = self._operation(request.method, request.url.path)
        if operation is None:
            return
        declared = operation["responses"]
        if str(response.status_code) not in declared and "default" not in declared:
            self.undeclared.append(
                f"{request.method} {request.url.path} answered {response.status_code}, "
                f"declared {sorted(declared)}"  # a hook sees the response before its body
            )


@contextmanager
def documented_client(app: FastAPI, **options: Any) -> Iterator[TestClient]:
    """A TestClient (lifespan run) that fails, on exit, if any answer was undeclared."""
    declared = DeclaredStatuses(app)
    with TestClient(app, **options) as client:
        client.event_hooks["response"].append(declared.check)
        yield client
    assert not declared.undeclared, "answers OpenAPI does not declare: " + "; ".join(
        declared.undeclared
    )
