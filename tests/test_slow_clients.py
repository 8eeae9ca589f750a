"""A client that sends half a request cannot hold a connection: the server closes it."""

import socket
import time
from pathlib import Path

import pytest

from app.core.migrate import upgrade
from tests.support.processes import Processes

pytestmark = pytest.mark.e2e

HEAD_TIMEOUT = 1.0


@pytest.fixture
def server(processes: Processes, tmp_path: Path) -> tuple[str, int]:
    database_url = f"sqlite:///{tmp_path / 'trainsvc.db'}"
    upgrade(database_url)
    processes.env.update(
        {
            "TRAINSVC_DATABASE_URL": database_url,
            "TRAINSVC_HTTP_HEADER_TIMEOUT_SECONDS": str(HEAD_TIMEOUT),
            "TRAINSVC_HTTP_KEEP_ALIVE_SECONDS": "30",  # so only the head timeout can close
        }
    )
    url = processes.api("serve")
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def closed_after(connection: socket.socket) -> float:
    """Seconds until the server closes the connection (recv returns b"")."""
    started = time.monotonic()
    connection.settimeout(20)
    while connection.recv(4096):
        pass
    return time.monotonic() - started


def test_half_a_request_line_is_closed_at_the_head_timeout(server: tuple[str, int]) -> None:
    with socket.create_connection(server) as connection:
        connection.sendall(b"GET /v1/hea")  # and stall
        assert closed_after(connection) < HEAD_TIMEOUT + 5


def test_headers_trickled_in_one_byte_at_a_time_are_cut_off(server: tuple[str, int]) -> None:
    with socket.create_connection(server) as connection:
        started = time.monotonic()
        connection.settimeout(0.3)
        request = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
        try:
            for byte in request:  # each byte well within any per-read idle timer
                connection.sendall(bytes([byte]))
                time.sleep(0.05)
        except OSError:
            pass  # the server closed it mid-trickle
        assert closed_after(connection) + (time.monotonic() - started) < HEAD_TIMEOUT + 6


def test_a_kept_alive_connection_gets_a_new_deadline_for_its_next_request(
    server: tuple[str, int],
) -> None:
    with socket.create_connection(server) as connection:
        connection.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        connection.settimeout(10)
        assert connection.recv(4096).startswith(b"HTTP/1.1 200")
        connection.sendall(b"GET /v1/hea")  # the second request stalls
        assert closed_after(connection) < HEAD_TIMEOUT + 5


def test_a_prompt_request_is_answered(server: tuple[str, int]) -> None:
    with socket.create_connection(server) as connection:
        connection.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        connection.settimeout(10)
        assert connection.recv(4096).startswith(b"HTTP/1.1 200")


def test_a_head_over_the_limit_is_refused_however_it_is_written(server: tuple[str, int]) -> None:
    """h11 bounded only a head still arriving: 17 to 70 KB sent in one write were served."""
    head = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
    with socket.create_connection(server) as connection:
        connection.sendall(head)  # all at once: the service's own check answers
        connection.settimeout(10)
        answer = b""
        while chunk := connection.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    assert b'"error": "headers_too_large"' in answer
    with socket.create_connection(server) as connection:
        for start in range(0, len(head), 4096):  # in pieces: h11 refuses it as it arrives
            connection.sendall(head[start : start + 4096])
            time.sleep(0.01)
        connection.settimeout(10)
        assert connection.recv(4096).startswith((b"HTTP/1.1 431", b"HTTP/1.1 400"))
