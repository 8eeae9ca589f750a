"""What a key check costs a status read: GET /v1/jobs/{id} with auth off, with a key (the
1 s cache), and with a key looked up every time (cache 0), in this one process on SQLite.

Rounds alternate between the three so drift on the machine hits each alike; prints reads per
second for each and their ratio to auth off (the median of the rounds), and the SQL statements
each read runs (exact, unlike the timing on a busy machine).

    python benchmarks/auth_overhead.py [--reads 300] [--rounds 5]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import Engine, event

from app.api.main import create_app
from app.core.config import Settings
from app.core.db import create_db_engine, create_session_factory, transaction
from app.core.keys import create_key
from app.core.migrate import upgrade


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reads", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    url = f"sqlite:///{folder}/bench.db"
    upgrade(url)
    engine = create_db_engine(url)
    with transaction(create_session_factory(engine)) as session:
        _, key = create_key(session, "default")
    engine.dispose()
    base = Settings(
        database_url=url,
        broker_url=f"sqla+sqlite:///{folder}/broker.db",
        key_requests_per_second=1e9,
        key_request_burst=10**9,
    )
    variants = {
        "auth off": (base.model_copy(update={"auth": "off"}), {}),
        "key, cached 1 s": (base, {"Authorization": f"Bearer {key}"}),
        "key, no cache": (
            base.model_copy(update={"key_cache_seconds": 0}),
            {"Authorization": f"Bearer {key}"},
        ),
    }
    clients = {}
    for name, (settings, headers) in variants.items():
        client = TestClient(create_app(settings), headers=headers)
        client.__enter__()
        clients[name] = client
    job_id = (
        clients["auth off"]
        .post("/v1/jobs", json={"dataset": {"name": "iris"}, "epochs": 1})
        .json()["id"]
    )
    statements = {name: _statements_per_read(client, job_id) for name, client in clients.items()}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, client in clients.items():
            start = time.perf_counter()
            for _ in range(args.reads):
                assert client.get(f"/v1/jobs/{job_id}").status_code == 200
            rates[name].append(args.reads / (time.perf_counter() - start))
    baseline = statistics.median(rates["auth off"])
    for name, values in rates.items():
        median = statistics.median(values)
        print(
            f"{name:18s} {median:8.0f} reads/s  ratio to auth off {median / baseline:.3f}  "
            f"SQL statements per read {statements[name]:.2f}"
        )
    for client in clients.values():
        client.__exit__(None, None, None)


def _statements_per_read(client: TestClient, job_id: str, reads: int = 50) -> float:
    count = 0

    def counted(*_args: object) -> None:
        nonlocal count
        count += 1

    event.listen(Engine, "before_cursor_execute", counted)
    try:
        for _ in range(reads):
            client.get(f"/v1/jobs/{job_id}")
    finally:
        event.remove(Engine, "before_cursor_execute", counted)
    return count / reads


if __name__ == "__main__":
    main()
