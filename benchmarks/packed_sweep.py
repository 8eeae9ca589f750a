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
"""

import argparse
import statistics
import time
from typing import Any

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--trials", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--alone", type=int, default=4, help="trials timed one at a time")
    args = parser.parse_args()
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
