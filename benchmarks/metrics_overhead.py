"""What the request middleware (metrics and request id) costs a status read: GET /v1/jobs/{id}.

Two copies of the app in one process, one with the middleware and one without, on one SQLite
database, read request by request in alternation (so a noisy neighbour hurts both alike);
prints the median latency of each and their ratio. docs/benchmarks.md records a run:

    python benchmarks/metrics_overhead.py [--reads 3000]
"""

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from fastapi import FastAPI

from app.api.main import create_app
from app.api.observability import RequestObservability
from app.core.config import Settings
from app.core.migrate import upgrade


def without_middleware(app: FastAPI) -> FastAPI:
    app.user_middleware = [m for m in app.user_middleware if m.cls is not RequestObservability]
    return app


async def read_once(client: httpx.AsyncClient, path: str) -> float:
    started = time.perf_counter()
    response = await client.get(path)
    elapsed = time.perf_counter() - started
    assert response.status_code == 200
    return elapsed


async def main(reads: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="trainsvc-bench-"))
    settings = Settings(
        database_url=f"sqlite:///{folder / 'trainsvc.db'}",
        broker_url=f"sqla+sqlite:///{folder / 'broker.db'}",
    )
    upgrade(settings.database_url)
    apps = {"on": create_app(settings), "off": without_middleware(create_app(settings))}
    async with (
        apps["on"].router.lifespan_context(apps["on"]),
        apps["off"].router.lifespan_context(apps["off"]),
    ):
        clients = {
            name: httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://bench")
            for name, app in apps.items()
        }
        spec = {"dataset": {"name": "digits"}, "epochs": 1}
        job_id = (await clients["on"].post("/v1/jobs", json=spec)).json()["id"]
        path = f"/v1/jobs/{job_id}"
        for _ in range(50):  # warm up: imports, connection pools, caches
            for client in clients.values():
                await read_once(client, path)
        # Request by request, alternating which goes first: a busy machine slows both alike.
        latencies: dict[str, list[float]] = {"on": [], "off": []}
        for read in range(reads):
            for name in ("on", "off") if read % 2 == 0 else ("off", "on"):
                latencies[name].append(await read_once(clients[name], path))
        for client in clients.values():
            await client.aclose()
    on, off = statistics.median(latencies["on"]), statistics.median(latencies["off"])
    print(f"GET /v1/jobs/{{id}}: {reads} reads each, alternating; median latency")
    print(f"middleware off: {off * 1e6:8.1f} us")
    print(f"middleware on:  {on * 1e6:8.1f} us")
    print(f"ratio on/off:   {on / off:8.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reads", type=int, default=3000)
    args = parser.parse_args()
    asyncio.run(main(args.reads))
