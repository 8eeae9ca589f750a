"""Packed trials against one job at a time: the same sweep, trained both ways in one process.

The sweep: N trials of an MLP 64-256-128-10 with batch norm and dropout on digits, each with
its own learning rate, dropout rate and seed, a few epochs. One at a time is TrainingRun per
job (what the worker does without packing); packed is one PackedRun over all N. Both do all
the per-epoch work the service does (validation, the eval pass over training data, per-layer
diagnostics, the epoch's snapshot). Every trial costs the same alone, so one at a time is
timed on the first --alone trials of the sweep. The two alternate, round by round, so that
drift on a shared machine hits both alike; the medians of the rounds are printed: trials per
second for each, their ratio, and the curve over pack size.

    python benchmarks/packed_sweep.py [--device cpu|cuda] [--trials 8 16 32 64] [--epochs 2]
        [--rounds 3] [--alone 4]

With --service, the end-to-end figure instead: the same sweep as a study of --service-jobs
jobs submitted to a real `trainsvc up` (embedded SQLite database and broker, one worker) in a
temporary folder, timed from the POST until every job has ended, once with packing on
(TRAINSVC_MAX_PACK=--max-pack) and once off (TRAINSVC_MAX_PACK=1), alternating per round:

    OMP_NUM_THREADS=2 python benchmarks/packed_sweep.py --service [--service-jobs 32]
        [--max-pack 8] [--epochs 2] [--rounds 1]
"""

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from app.core.catalog import BUILTIN_DATASETS
from app.core.spec import JobSpec
from worker.training.data import load_builtin, prepare
from worker.training.loop import TrainingRun
from worker.training.packed import PackedRun


def sweep(count: int, epochs: int, device: str) -> list[JobSpec]:
    specs = []
    for i in range(count):
        payload: dict[str, Any] = {
            "dataset": {"name": "digits", "batch_size": 64},
            "model": {
                "hidden_sizes": [256, 128],
                "normalization": {"type": "batch_norm"},
                "dropout": {"rate": 0.1 + 0.4 * (i % 8) / 8},
            },
            "optimizer": {"type": "adam", "lr": 1e-3 * (1 + i % 5)},
            "epochs": epochs,
            "seed": i,
            "device": device,
        }
        specs.append(JobSpec.model_validate(payload))
    return specs


def study(jobs: int, epochs: int, device: str) -> dict[str, Any]:
    """The sweep as one study: lr x dropout rate x seed, jobs = 4 * 2 * (jobs // 8)."""
    base = sweep(1, epochs, device)[0].model_dump(mode="json", exclude={"seed"})
    return {
        "name": f"packed-sweep-{jobs}",
        "base": base,
        "grid": {
            "optimizer.lr": [1e-3, 2e-3, 3e-3, 4e-3],
            "model.dropout.rate": [0.1, 0.3],
            "seed": list(range(max(1, jobs // 8))),
        },
    }


def time_service(payload: dict[str, Any], max_pack: int) -> float:
    """Seconds from the study's POST until its last job ended, on a fresh `trainsvc up`."""
    folder = Path(tempfile.mkdtemp(prefix="trainsvc-packed-"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TRAINSVC_")},
        "TRAINSVC_DATABASE_URL": f"sqlite:///{folder / 'trainsvc.db'}",
        "TRAINSVC_BROKER_URL": f"sqla+sqlite:///{folder / 'broker.db'}",
        "TRAINSVC_MAX_PACK": str(max_pack),
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "up", "--port", str(port)],
        cwd=folder,
        env=env,
        stdout=(folder / "up.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if client.get("/v1/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"trainsvc up did not become ready: {folder / 'up.log'}")
                time.sleep(0.2)
            started = time.perf_counter()
            created = client.post("/v1/studies", json=payload).raise_for_status().json()
            while True:
                counts = client.get(f"/v1/studies/{created['id']}").json()["counts"]
                if not counts.get("queued") and not counts.get("running"):
                    break
                time.sleep(0.2)
            seconds = time.perf_counter() - started
            if counts.get("succeeded") != len(created["jobs"]):
                raise RuntimeError(f"not every job succeeded: {counts} ({folder / 'up.log'})")
            return seconds
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def main_service(args: argparse.Namespace) -> None:
    payload = study(args.service_jobs, args.epochs, args.device)
    jobs = 8 * len(payload["grid"]["seed"])
    print(f"service: trainsvc up, one worker; {jobs} jobs, {args.epochs} epochs, {args.device}")
    packed, alone = [], []
    for _ in range(args.rounds):
        packed.append(time_service(payload, args.max_pack))
        alone.append(time_service(payload, 1))
    p, a = statistics.median(packed), statistics.median(alone)
    print(f"{'jobs':>5} {'max_pack':>8} {'unpacked s':>11} {'packed s':>9} {'speed-up':>9}")
    print(f"{jobs:>5} {args.max_pack:>8} {a:>11.1f} {p:>9.1f} {a / p:>9.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--trials", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--alone", type=int, default=4, help="trials timed one at a time")
    parser.add_argument("--service", action="store_true", help="the end-to-end figure instead")
    parser.add_argument("--service-jobs", type=int, default=32)
    parser.add_argument("--max-pack", type=int, default=8)
    args = parser.parse_args()
    if args.service:
        main_service(args)
        return
    first = sweep(1, args.epochs, args.device)[0]
    data = prepare(
        first.dataset, BUILTIN_DATASETS["digits"], load_builtin(first.dataset)
    )  # one dataset for all: the features are the same for every trial of the sweep

    def synchronize() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    print(f"device={args.device} threads={torch.get_num_threads()} epochs={args.epochs}")
    print(f"{'trials':>6} {'alone trials/s':>15} {'packed trials/s':>16} {'ratio':>6}")
    for count in args.trials:
        specs = sweep(count, args.epochs, args.device)
        alone_rates, packed_rates = [], []
        for _ in range(args.rounds):
            synchronize()
            started = time.perf_counter()
            for spec in specs[: args.alone]:
                for _ in TrainingRun(spec, data).epochs():
                    pass
            synchronize()
            alone_rates.append(min(count, args.alone) / (time.perf_counter() - started))
            started = time.perf_counter()
            for _ in PackedRun(specs, data).epochs():
                pass
            synchronize()
            packed_rates.append(count / (time.perf_counter() - started))
        alone, packed = statistics.median(alone_rates), statistics.median(packed_rates)
        print(f"{count:>6} {alone:>15.2f} {packed:>16.2f} {packed / alone:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
