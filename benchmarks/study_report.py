"""Study report latency: GET /v1/studies/{id}/report for 200 jobs x 100 epochs on PostgreSQL.

Builds a throw-away database, stores one study of 200 succeeded jobs (2 normalizations x
2 dropout rates x 5 learning rates x 10 seeds) with 100 epochs each of realistic metrics
(including per-layer diagnostics, which the report must not drag along), then times the
report over HTTP (the median of the rounds) against a baseline that loads each job's
metrics with its own query, the way a client of GET /v1/jobs/{id}/metrics would.

    PYTHONPATH=. .venv/bin/python benchmarks/study_report.py [--url postgresql+psycopg://...]
"""

import argparse
import itertools
import statistics
import time
import uuid

import numpy as np
import sqlalchemy as sa
from fastapi.testclient import TestClient

from app.api.jobs.service import list_metrics, new_job
from app.api.main import create_app
from app.core.config import Settings
from app.core.db import create_db_engine, create_session_factory
from app.core.migrate import upgrade
from app.core.models import EpochMetric, Job, Study
from app.core.spec import JobSpec

GRID = {
    "model.normalization.type": ["none", "batch_norm"],
    "model.dropout.rate": [0.0, 0.5],
    "optimizer.lr": [0.01, 0.03, 0.1, 0.3, 1.0],
    "seed": list(range(10)),
}
EPOCHS = 100
BASE = {"dataset": {"name": "digits"}, "model": {"hidden_sizes": [128, 64]}, "epochs": EPOCHS}


def fill(session_factory: sa.orm.sessionmaker[sa.orm.Session]) -> uuid.UUID:
    rng = np.random.default_rng(0)
    with session_factory() as session:
        study = Study(tenant="default", name="bench", base=BASE, grid=GRID, request_sha256="0" * 64)
        session.add(study)
        session.flush()
        for values in itertools.product(*GRID.values()):
            point = dict(zip(GRID, values, strict=True))
            spec = JobSpec.model_validate({**BASE, "seed": point["seed"]})
            job = new_job(spec, tenant="default", study_id=study.id, grid_point=point)
            job.status = "succeeded"
            session.add(job)
            session.flush()
            accuracy = np.minimum(0.98, 0.1 + np.cumsum(rng.uniform(0, 0.03, EPOCHS)))
            layers = [
                {
                    "weight_norm": 1.0,
                    "grad_norm": 0.1,
                    "pre_activation_mean": 0.0,
                    "pre_activation_std": 1.0,
                }
                for _ in range(3)
            ]
            session.add_all(
                EpochMetric(
                    job_id=job.id,
                    epoch=epoch + 1,
                    attempt=1,
                    train_loss=1.0,
                    train_accuracy=float(accuracy[epoch]),
                    val_loss=float(1.0 - accuracy[epoch]),
                    val_accuracy=float(accuracy[epoch]),
                    lr=0.1,
                    epoch_seconds=0.05,
                    diagnostics={
                        "generalization_gap": float(rng.normal(0.1, 0.02)),
                        "step_loss_std": 0.05,
                        "grad_norm_mean": 1.0,
                        "layers": layers,
                    },
                )
                for epoch in range(EPOCHS)
            )
        session.commit()
        return study.id


def per_job_baseline(
    session_factory: sa.orm.sessionmaker[sa.orm.Session], study_id: uuid.UUID
) -> None:
    with session_factory() as session:
        jobs = session.scalars(sa.select(Job).where(Job.study_id == study_id)).all()
        for job in jobs:
            list_metrics(session, job.id, None)


def timed(call: "object", rounds: int) -> float:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()  # type: ignore[operator]
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    admin = sa.create_engine(args.url, isolation_level="AUTOCOMMIT")
    name = f"trainsvc_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.make_url(args.url).set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        engine = create_db_engine(url)
        session_factory = create_session_factory(engine)
        study_id = fill(session_factory)
        # A broker never reached: the benchmark only reads.
        app = create_app(Settings(database_url=url, broker_url="redis://127.0.0.1:1/0", auth="off"))
        with TestClient(app) as client:

            def report() -> None:
                response = client.get(f"/v1/studies/{study_id}/report")
                response.raise_for_status()

            report()  # warm-up: connections, imports
            service = timed(report, args.rounds)
        baseline = timed(lambda: per_job_baseline(session_factory, study_id), args.rounds)
        engine.dispose()
        print(f"200 jobs x {EPOCHS} epochs on PostgreSQL, median of {args.rounds}:")
        print(f"  GET /v1/studies/{{id}}/report (2 queries, whole report): {service:.3f} s")
        print(f"  baseline: loading each job's metrics with its own query:  {baseline:.3f} s")
        print(f"  ratio baseline / report: {baseline / service:.1f}x")
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
