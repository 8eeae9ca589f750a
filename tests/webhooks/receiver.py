"""A webhook receiver for tests: a real HTTP server on 127.0.0.1 that records what it gets."""

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """Answers each POST with the next of `statuses` (the last one repeats), recording it.

    With `stall_seconds`, each answer promises a 1 GiB body, sends 1 KiB of it and then
    stalls that long: as a receiver with an endless or huge answer does. With `trickle_seconds`,
    each answer's head is sent a byte at a time, that long apart: each read is quick, the
    whole answer is not."""

    def __init__(
        self,
        statuses: tuple[int, ...] = (200,),
        port: int = 0,
        stall_seconds: float = 0.0,
        trickle_seconds: float = 0.0,
    ) -> None:
        self.statuses = list(statuses)
        self.received: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.received.append(Received(self.path, dict(self.headers), body))
                    status = (
                        receiver.statuses.pop(0)
                        if len(receiver.statuses) > 1
                        else (receiver.statuses[0])
                    )
                if trickle_seconds:
                    for byte in f"HTTP/1.1 {status} OK\r\nContent-Length: 0\r\n\r\n".encode():
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(trickle_seconds)
                    return
                self.send_response(status)
                self.send_header("Content-Length", str(2**30 if stall_seconds else 0))
                self.end_headers()
                if stall_seconds:
                    self.wfile.write(b"x" * 1024)
                    self.wfile.flush()
                    time.sleep(stall_seconds)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port: int = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks/trainsvc"

    def start(self) -> None:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def receiving(
    statuses: tuple[int, ...] = (200,),
    port: int = 0,
    stall_seconds: float = 0.0,
    trickle_seconds: float = 0.0,
) -> Iterator[Receiver]:
    receiver = Receiver(statuses, port, stall_seconds, trickle_seconds)
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()
