"""Packed trials against one job at a time and N worker processes: the same sweep, four ways.

The sweeps (--model, both by default): N trials of an MLP 64-256-128-10 with batch norm and
dropout on digits, and of a small CNN on mnist1d (channels [32, 64], kernel 5, batch norm,
dropout); with --model resnet, a small ResNet on mnist1d (stages [16, 32], one block each, batch
norm, dropout), each trial with its own learning rate, dropout rate and seed, a few epochs. Four
arms: one job at a time (TrainingRun per job, what a worker with one process does without
packing); --processes worker processes (what a worker with `--concurrency N` does: spawned
processes, each training its share one job at a time, torch's threads split so that N times
the threads are the cores); packed (one PackedRun over all N, in this process); and the same
processes each training its share of all N as one pack (what `--concurrency N` does with
packing on: a pack per process). All do the per-epoch work
the service does (validation, the eval pass over training data, per-layer diagnostics, the
epoch's snapshot). Every trial costs the same alone, so one at a time is timed on --alone
trials and the processes on --alone trials each. The processes start, load the data and warm
up once, before any timing; a measurement runs from handing them their trials until the last
is done. The arms alternate, round by round, so that drift on a shared machine hits all alike;
printed are the medians of the rounds' trials per second for each arm and of the rounds' own
ratios (each round's arms measured side by side), over pack size.

    python benchmarks/packed_sweep.py [--model mlp cnn resnet] [--device cpu|cuda]
        [--trials 8 16 32 64] [--epochs 2] [--rounds 3] [--alone 2] [--processes 2]

With --service, the end-to-end figure instead: the same sweep as a study of --service-jobs
jobs submitted to a real `trainsvc up` (embedded SQLite database and broker, one worker) in a
temporary folder, once the worker has trained a warm-up job (one epoch of the same model),
timed from the POST until every job has ended, once with packing on
(TRAINSVC_MAX_PACK=--max-pack) and once off (TRAINSVC_MAX_PACK=1), alternating per round, the
worker with --concurrency processes in both (TRAINSVC_WORKER_CONCURRENCY); printed are the
medians of the rounds' seconds and of the rounds' own speed-ups:

    OMP_NUM_THREADS=2 python benchmarks/packed_sweep.py --service [--model mlp cnn resnet]
        [--service-jobs 32] [--max-pack 8] [--epochs 2] [--rounds 1] [--concurrency 1]
"""

import argparse
import multiprocessing
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
from worker.training.data import PreparedData, load_builtin, prepare
from worker.training.loop import TrainingRun
from worker.training.packed import PackedRun

MODELS = ("mlp", "cnn", "resnet")


def trial(model: str, index: int, epochs: int, device: str) -> JobSpec:
    """The sweep's trial `index`: its learning rate, dropout rate and seed vary with it."""
    if model == "mlp":
        dataset = "digits"
        layers: dict[str, Any] = {"hidden_sizes": [256, 128]}
    elif model == "cnn":
        dataset = "mnist1d"
        layers = {"architecture": "cnn", "hidden_sizes": [32, 64], "kernel_size": 5}
    else:
        dataset = "mnist1d"
        layers = {"architecture": "resnet", "hidden_sizes": [16, 32], "kernel_size": 3}
    payload: dict[str, Any] = {
        "dataset": {"name": dataset, "batch_size": 64},
        "model": {
            **layers,
            "normalization": {"type": "batch_norm"},
            "dropout": {"rate": 0.1 + 0.4 * (index % 8) / 8},
        },
        "optimizer": {"type": "adam", "lr": 1e-3 * (1 + index % 5)},
        "epochs": epochs,
        "seed": index,
        "device": device,
    }
    return JobSpec.model_validate(payload)


def sweep(model: str, count: int, epochs: int, device: str) -> list[JobSpec]:
    return [trial(model, index, epochs, device) for index in range(count)]


def load(spec: JobSpec) -> PreparedData:
    # One dataset for all: the features are the same for every trial of a sweep.
    return prepare(spec.dataset, BUILTIN_DATASETS[spec.dataset.name], load_builtin(spec.dataset))


def train_alone(specs: list[JobSpec], data: PreparedData) -> None:
    for spec in specs:
        for _ in TrainingRun(spec, data).epochs():
            pass
    if specs and specs[0].device == "cuda":
        torch.cuda.synchronize()


def train_packed(specs: list[JobSpec], data: PreparedData) -> None:
    for _ in PackedRun(specs, data).epochs():
        pass
    if specs and specs[0].device == "cuda":
        torch.cuda.synchronize()


def study(model: str, jobs: int, epochs: int, device: str) -> dict[str, Any]:
    """The sweep as one study: lr x dropout rate x seed, jobs = 4 * 2 * (jobs // 8)."""
    base = trial(model, 0, epochs, device).model_dump(mode="json", exclude={"seed"})
    return {
        "name": f"packed-sweep-{model}-{jobs}",
        "base": base,
        "grid": {
            "optimizer.lr": [1e-3, 2e-3, 3e-3, 4e-3],
            "model.dropout.rate": [0.1, 0.3],
            "seed": list(range(max(1, jobs // 8))),
        },
    }


def _serve(
    threads: int,
    models: list[str],
    epochs: int,
    device: str,
    tasks: "multiprocessing.Queue[tuple[str, list[int], bool] | None]",
    done: "multiprocessing.Queue[str | None]",
) -> None:
    """One worker process: loads the data and warms up, then trains the trials it is handed,
    one at a time or as one pack."""
    try:
        torch.set_num_threads(threads)
        data = {model: load(trial(model, 0, epochs, device)) for model in models}
        for model in models:  # the first run in a process pays for allocator and kernel set-up
            train_alone([trial(model, 0, 1, device)], data[model])
            train_packed([trial(model, index, 1, device) for index in range(2)], data[model])
        done.put(None)
        while (task := tasks.get()) is not None:
            model, indices, packed = task
            specs = [trial(model, index, epochs, device) for index in indices]
            (train_packed if packed else train_alone)(specs, data[model])
            done.put(None)
    except Exception as exc:
        done.put(f"{type(exc).__name__}: {exc}")


class WorkerProcesses:
    """Spawned processes, as a worker's `--concurrency N` pool: each trains one job at a time,
    or, asked to, its share as one pack (what the pool does with packing on).

    Started, loaded and warmed up once, so that a measurement holds training only. Each has
    its own queue of tasks, so that every process gets its share of every measurement.
    """

    def __init__(self, count: int, models: list[str], epochs: int, device: str) -> None:
        # Spawn, not fork: a forked child cannot use CUDA once its parent has (this one has,
        # with --device cuda), and each process loads and warms up its own, as a pool's does.
        context = multiprocessing.get_context("spawn")
        self.threads = max(1, torch.get_num_threads() // count)  # N x threads = the cores
        self.done: multiprocessing.Queue[str | None] = context.Queue()
        self.tasks: list[multiprocessing.Queue[tuple[str, list[int], bool] | None]] = [
            context.Queue() for _ in range(count)
        ]
        self.processes = [
            context.Process(
                target=_serve,
                args=(self.threads, models, epochs, device, tasks, self.done),
                daemon=True,  # never outlives this benchmark
            )
            for tasks in self.tasks
        ]
        for process in self.processes:
            process.start()
        self._wait()

    def _wait(self) -> None:
        for _ in self.processes:
            failure = self.done.get()
            if failure is not None:
                raise RuntimeError(f"a worker process failed: {failure}")

    def seconds(self, model: str, indices: list[int], packed: bool = False) -> float:
        """Wall time for the processes to train these trials, dealt round robin."""
        started = time.perf_counter()
        for rank, tasks in enumerate(self.tasks):
            tasks.put((model, indices[rank :: len(self.tasks)], packed))
        self._wait()
        return time.perf_counter() - started

    def close(self) -> None:
        for tasks in self.tasks:
            tasks.put(None)
        for process in self.processes:
            process.join(timeout=60)
            if process.is_alive():
                process.terminate()


def time_service(payload: dict[str, Any], max_pack: int, concurrency: int) -> float:
    """Seconds from the study's POST until its last job ended, on a fresh `trainsvc up` (its
    worker with `concurrency` processes) that has trained a warm-up job."""
    folder = Path(tempfile.mkdtemp(prefix="trainsvc-packed-"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        # Not this process's OMP_NUM_THREADS either: the worker gives each of its processes
        # cores / processes threads, and an operator's OMP_NUM_THREADS would override that (2
        # threads in each of 2 processes on 2 cores spin against each other, several times
        # slower: the first --concurrency 2 run here measured 23 to 41 s a CNN job, not 6 to 10).
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith("TRAINSVC_") and k != "OMP_NUM_THREADS"
        },
        "TRAINSVC_DATABASE_URL": f"sqlite:///{folder / 'trainsvc.db'}",
        "TRAINSVC_BROKER_URL": f"sqla+sqlite:///{folder / 'broker.db'}",
        "TRAINSVC_MAX_PACK": str(max_pack),
        "TRAINSVC_WORKER_CONCURRENCY": str(concurrency),
        # The server runs in the temporary folder, where a relative PYTHONPATH (`.`) names
        # nothing and the venv's editable install would serve its own checkout's code: the
        # code measured must be this checkout's, the one the in-process arms measure.
        "PYTHONPATH": os.pathsep.join(
            [
                str(Path(__file__).resolve().parents[1]),
                *os.environ.get("PYTHONPATH", "").split(os.pathsep),
            ]
        ),
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
            # A running service, as a study meets it: the worker started and has trained a
            # job (one epoch of the same model), so neither arm counts the worker's start.
            warm_up = client.post("/v1/jobs", json={**payload["base"], "epochs": 1})
            warm_up_id = warm_up.raise_for_status().json()["id"]
            while (status := client.get(f"/v1/jobs/{warm_up_id}").json()["status"]) in (
                "queued",
                "running",
            ):
                time.sleep(0.2)
            if status != "succeeded":
                raise RuntimeError(f"the warm-up job ended {status} ({folder / 'up.log'})")
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
    print(
        f"service: trainsvc up, one worker of {args.concurrency} processes; "
        f"{args.epochs} epochs, {args.device}"
    )
    print(
        f"{'model':>5} {'jobs':>5} {'max_pack':>8} {'unpacked s':>11} {'packed s':>9}"
        f" {'speed-up':>9}"
    )
    for model in args.model:
        payload = study(model, args.service_jobs, args.epochs, args.device)
        jobs = 8 * len(payload["grid"]["seed"])
        packed, alone = [], []
        for _ in range(args.rounds):
            packed.append(time_service(payload, args.max_pack, args.concurrency))
            alone.append(time_service(payload, 1, args.concurrency))
        speedup = statistics.median(a / p for a, p in zip(alone, packed, strict=True))
        a, p = statistics.median(alone), statistics.median(packed)
        print(
            f"{model:>5} {jobs:>5} {args.max_pack:>8} {a:>11.1f} {p:>9.1f} {speedup:>9.2f}",
            flush=True,
        )


def main_sweep(args: argparse.Namespace, model: str, processes: WorkerProcesses) -> None:
    data = load(trial(model, 0, args.epochs, args.device))
    train_alone([trial(model, 0, 1, args.device)], data)  # warm up, as the processes did
    train_packed([trial(model, index, 1, args.device) for index in range(2)], data)
    n = len(processes.processes)
    print(
        f"model={model} device={args.device} epochs={args.epochs} threads={torch.get_num_threads()}"
        f" processes={n}x{processes.threads} threads; medians of {args.rounds} rounds"
    )
    print(
        f"{'trials':>6} {'one at a time':>13} {f'{n} processes':>12} {'packed':>8}"
        f" {f'{n} packs':>8} {'processes/one':>13} {'packed/one':>10} {f'{n} packs/one':>12}"
    )
    for count in args.trials:
        specs = sweep(model, count, args.epochs, args.device)
        alone_rates, process_rates, packed_rates, packs_rates = [], [], [], []
        for _ in range(args.rounds):
            started = time.perf_counter()
            train_alone(specs[: args.alone], data)
            alone_rates.append(min(count, args.alone) / (time.perf_counter() - started))
            indices = list(range(min(count, args.alone * n)))
            process_rates.append(len(indices) / processes.seconds(model, indices))
            started = time.perf_counter()
            train_packed(specs, data)
            packed_rates.append(count / (time.perf_counter() - started))
            # The N processes again, each training its share of all the trials as one pack.
            every = list(range(count))
            packs_rates.append(count / processes.seconds(model, every, packed=True))
        rates = [alone_rates, process_rates, packed_rates, packs_rates]
        ratios = [
            [r / a for r, a in zip(arm, alone_rates, strict=True)]
            for arm in (process_rates, packed_rates, packs_rates)
        ]
        alone, spread, packed, packs = (statistics.median(values) for values in rates)
        spread_over_alone, packed_over_alone, packs_over_alone = (
            statistics.median(r) for r in ratios
        )
        print(
            f"{count:>6} {alone:>13.2f} {spread:>12.2f} {packed:>8.2f} {packs:>8.2f}"
            f" {spread_over_alone:>13.2f} {packed_over_alone:>10.2f} {packs_over_alone:>12.2f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["mlp", "cnn"], choices=MODELS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--trials", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--alone", type=int, default=2, help="trials timed per process")
    parser.add_argument("--processes", type=int, default=2, help="worker processes")
    parser.add_argument("--service", action="store_true", help="the end-to-end figure instead")
    parser.add_argument("--service-jobs", type=int, default=32)
    parser.add_argument("--max-pack", type=int, default=8)
    parser.add_argument(
        "--concurrency", type=int, default=1, help="--service: the worker's processes"
    )
    args = parser.parse_args()
    if args.service:
        main_service(args)
        return
    processes = WorkerProcesses(args.processes, args.model, args.epochs, args.device)
    try:
        for model in args.model:
            main_sweep(args, model, processes)
    finally:
        processes.close()


if __name__ == "__main__":
    main()
