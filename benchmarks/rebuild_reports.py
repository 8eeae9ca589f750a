"""Rebuild study reports from a stopped embedded service's SQLite file, with the service's own
report and plot code, for studies whose `GET /v1/studies/{id}/report` cannot answer.

Why: a run whose gradients overflowed without its loss becoming NaN stores `Infinity` in its
diagnostics JSON (Python's json writes it; SQLite's JSON functions reject it), and the report's
SQL extraction then fails for the whole study (answered 503). Python's json reads `Infinity`,
so this reads the same columns in Python and calls `build_report` and `plots.draw` on them.

    PYTHONPATH=. .venv/bin/python benchmarks/rebuild_reports.py DB.sqlite STUDY_NAME
        [--out docs/findings] [--seeds 0,1]
"""

import argparse
import json
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from app.api.studies.rendering import csv_table
from app.core.catalog import BUILTIN_DATASETS
from app.core.studies import plots
from app.core.studies.report import Run, build_report


def load(db: Path, name: str) -> tuple[str, dict[str, list[Any]], list[Run]]:
    connection = sqlite3.connect(db)
    study_id, grid_json = connection.execute(
        "SELECT id, grid FROM studies WHERE name = ?", (name,)
    ).fetchone()
    runs: dict[str, Run] = {}
    for job_id, status, point, error_type, spec in connection.execute(
        "SELECT id, status, grid_point, error_type, spec FROM jobs WHERE study_id = ?", (study_id,)
    ):
        dataset = json.loads(spec)["dataset"]["name"]
        info = BUILTIN_DATASETS.get(dataset)
        runs[job_id] = Run(
            uuid.UUID(job_id),
            status,
            json.loads(point),
            error_type,
            info.num_classes if info else None,
        )
    rows: dict[str, list[list[float]]] = {}
    for job_id, epoch, val_loss, val_accuracy, seconds, diagnostics in connection.execute(
        "SELECT m.job_id, m.epoch, m.val_loss, m.val_accuracy, m.epoch_seconds, m.diagnostics "
        "FROM epoch_metrics m JOIN jobs j ON j.id = m.job_id WHERE j.study_id = ? "
        "ORDER BY m.job_id, m.epoch",
        (study_id,),
    ):
        found = json.loads(diagnostics or "{}")
        rows.setdefault(job_id, []).append(
            [
                epoch,
                val_loss,
                val_accuracy,
                seconds,
                found.get("generalization_gap", np.nan),
                found.get("step_loss_std", np.nan),
            ]
        )
    for job_id, table in rows.items():
        columns = np.array(table, dtype=np.float64).T
        run = runs[job_id]
        run.epochs = columns[0].astype(np.int64)
        run.val_loss, run.val_accuracy, run.epoch_seconds = columns[1], columns[2], columns[3]
        run.gap, run.step_loss_std = columns[4], columns[5]
    return str(uuid.UUID(study_id)), json.loads(grid_json), list(runs.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db", type=Path)
    parser.add_argument("study_name")
    parser.add_argument("--out", type=Path, default=Path("docs/findings"))
    parser.add_argument("--request", default=None, help="the POST body, recorded in the report")
    args = parser.parse_args()
    study_id, grid, runs = load(args.db, args.study_name)
    report: dict[str, Any] = {
        "study_id": study_id,
        "name": args.study_name,
        **build_report(grid, runs),
        "plots": {name: f"{args.study_name}-{name}.png" for name in plots.available(grid)},
        "rebuilt_from": "the stopped service's SQLite file, by benchmarks/rebuild_reports.py",
        "request": json.loads(args.request) if args.request else None,
    }
    out = args.out
    (out / f"{args.study_name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{args.study_name}.csv").write_text(csv_table(report))
    for name in plots.available(grid):
        (out / f"{args.study_name}-{name}.png").write_bytes(plots.draw(name, grid, runs))
    print(f"rebuilt {args.study_name}: {len(runs)} jobs, {report['counts']}")


if __name__ == "__main__":
    main()
