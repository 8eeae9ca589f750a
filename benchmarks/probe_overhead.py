"""What the probes of issue 12 cost a job, at their default sampling (every 100 steps, and step 0
of every epoch): the landscape, the covariate shift, the gradient noise, and all three.

Each configuration trains the same spec in this process with probes off and on, alternating
which goes first, and prints the median job time and the ratio on/off. Job time is this
process's CPU time (time.process_time, with OMP_NUM_THREADS=1): on a shared machine wall time
swings with the neighbours' load far more than the probes cost. docs/benchmarks.md records a run:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/probe_overhead.py [--repeats 3]
"""

import argparse
import statistics
import time
from typing import Any

from app.core.catalog import BUILTIN_DATASETS
from app.core.spec import JobSpec
from worker.training.data import load_builtin, prepare
from worker.training.loop import TrainingRun

PROBES: dict[str, dict[str, Any]] = {
    "landscape": {"landscape": {}},
    "covariate_shift": {"covariate_shift": {}},
    "gradient_noise": {"gradient_noise": {}},
    "all three": {"landscape": {}, "covariate_shift": {}, "gradient_noise": {}},
}
JOBS: dict[str, dict[str, Any]] = {
    "mlp 128-64 bn, digits, batch 64 (23 steps/epoch)": {
        "dataset": {"name": "digits", "batch_size": 64},
        "model": {"hidden_sizes": [128, 64], "normalization": {"type": "batch_norm"}},
        "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9},
        "epochs": 20,
    },
    "mlp 6x64 bn+dropout, mnist1d, batch 32 (125 steps/epoch)": {
        "dataset": {"name": "mnist1d", "batch_size": 32},
        "model": {
            "hidden_sizes": [64] * 6,
            "normalization": {"type": "batch_norm"},
            "dropout": {"rate": 0.2},
        },
        "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9},
        "epochs": 6,
    },
    "cnn 16-32 bn, digits, batch 64 (23 steps/epoch)": {
        "dataset": {"name": "digits", "batch_size": 64},
        "model": {
            "architecture": "cnn",
            "hidden_sizes": [16, 32],
            "normalization": {"type": "batch_norm"},
        },
        "optimizer": {"type": "adam", "lr": 0.003},
        "epochs": 10,
    },
}


def job_seconds(payload: dict[str, Any]) -> float:
    spec = JobSpec.model_validate({**payload, "device": "cpu"})
    info = BUILTIN_DATASETS[spec.dataset.name]
    data = prepare(spec.dataset, info, load_builtin(spec.dataset))
    started = time.process_time()
    run = TrainingRun(spec, data)
    for _ in run.epochs():
        pass
    return time.process_time() - started


def main(repeats: int) -> None:
    print("probe overhead at the default sampling: median job CPU seconds, ratio on/off")
    for job_name, job in JOBS.items():
        print(f"\n{job_name}")
        job_seconds(job)  # warm up: imports, the dataset, allocator
        for probe_name, probes in PROBES.items():
            timings: dict[str, list[float]] = {"off": [], "on": []}
            for repeat in range(repeats):
                order = ("off", "on") if repeat % 2 == 0 else ("on", "off")
                for which in order:
                    payload = {**job, "diagnostics": probes} if which == "on" else job
                    timings[which].append(job_seconds(payload))
            off, on = statistics.median(timings["off"]), statistics.median(timings["on"])
            print(f"  {probe_name:16s} off {off:6.2f} s  on {on:6.2f} s  ratio {on / off:5.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    main(parser.parse_args().repeats)
