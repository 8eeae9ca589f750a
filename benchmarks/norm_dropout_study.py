"""What normalization and dropout do to training here, measured with the service's own trainer.

Three small studies, every cell the mean over several seeds, each run on CPU (where the trainer
is bit-reproducible) in parallel worker processes, against the baseline of no normalization
and no dropout:

1. normalization x learning rate: final validation accuracy, epochs to 90 % validation
   accuracy, and runs that diverged (MLP on digits, SGD with momentum, constant rate);
2. dropout x normalization on a small training set: best and final validation accuracy and the
   final generalization gap (MLP on 150 digits; 1-D CNN on 500 mnist1d signals);
3. the pre-activation spread per layer of a deeper MLP after one epoch (the probe diagnostics).

Prints markdown tables; docs/findings.md records them with the command that made them:

    python benchmarks/norm_dropout_study.py [--seeds 3] [--workers N]
"""

import argparse
import functools
import os
import statistics
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

from app.core.catalog import BUILTIN_DATASETS
from app.core.spec import DatasetSpec, JobSpec
from worker.training.data import PreparedData, load_builtin, prepare
from worker.training.loop import Diverged, TrainingRun

LEARNING_RATES = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
NORMS = ["none", "batch_norm", "layer_norm", "rms_norm"]


@functools.cache
def _data(dataset_json: str) -> PreparedData:
    spec = DatasetSpec.model_validate_json(dataset_json)
    return prepare(spec, BUILTIN_DATASETS[spec.name], load_builtin(spec))


def run_one(payload: dict[str, Any]) -> dict[str, Any]:
    """One training run; its per-epoch metrics and diagnostics, or where it diverged."""
    torch.set_num_threads(1)  # one process per core
    spec = JobSpec.model_validate({**payload, "device": "cpu"})
    run = TrainingRun(spec, _data(spec.dataset.model_dump_json()))
    epochs: list[dict[str, Any]] = []
    try:
        for result in run.epochs():
            epochs.append({**result.metrics, **result.diagnostics})
    except Diverged as exc:
        return {"epochs": epochs, "diverged": exc.epoch}
    return {"epochs": epochs, "diverged": None}


def _mean(values: Iterable[float]) -> str:
    values = list(values)
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def learning_rate_study(pool: ProcessPoolExecutor, seeds: int) -> None:
    cells = [(norm, lr, seed) for norm in NORMS for lr in LEARNING_RATES for seed in range(seeds)]
    payloads = [
        {
            "dataset": {"name": "digits", "batch_size": 64},
            "model": {"hidden_sizes": [64, 64], "normalization": {"type": norm}},
            "optimizer": {"type": "sgd", "lr": lr, "momentum": 0.9},
            "epochs": 15,
            "seed": seed,
        }
        for norm, lr, seed in cells
    ]
    results = dict(zip(cells, pool.map(run_one, payloads), strict=True))
    print("\n### 1. Normalization x learning rate (MLP 64-64 on digits, SGD momentum 0.9)\n")
    print("Final validation accuracy after 15 epochs (diverged runs count as 0); in brackets,")
    print("the mean epoch at which validation accuracy first reached 0.90 (- if never).\n")
    print("| normalization | " + " | ".join(f"lr {lr:g}" for lr in LEARNING_RATES) + " |")
    print("| --- |" + " ---: |" * len(LEARNING_RATES))
    for norm in NORMS:
        row = []
        for lr in LEARNING_RATES:
            runs = [results[norm, lr, seed] for seed in range(seeds)]
            final = [r["epochs"][-1]["val_accuracy"] if not r["diverged"] else 0.0 for r in runs]
            reached = [
                next((e["epoch"] for e in _numbered(r) if e["val_accuracy"] >= 0.9), None)
                for r in runs
            ]
            hit = [epoch for epoch in reached if epoch is not None]
            diverged = sum(1 for r in runs if r["diverged"])
            cell = (
                f"{statistics.mean(final):.3f} ({statistics.mean(hit):.1f})"
                if hit
                else (f"{statistics.mean(final):.3f} (-)")
            )
            row.append(cell + (f" {diverged}/{seeds} diverged" if diverged else ""))
        print(f"| {norm} | " + " | ".join(row) + " |")


def _numbered(run: dict[str, Any]) -> list[dict[str, Any]]:
    return [{**epoch, "epoch": i + 1} for i, epoch in enumerate(run["epochs"])]


def dropout_study(pool: ProcessPoolExecutor, seeds: int) -> None:
    setups = {
        "MLP 256-256, 150 digits, 100 epochs": {
            "dataset": {"name": "digits", "train_subset": 150, "batch_size": 32},
            "model": {"hidden_sizes": [256, 256]},
            "dropout_type": "standard",
            "epochs": 100,
        },
        "1-D CNN 32-32, 500 mnist1d, 40 epochs": {
            "dataset": {"name": "mnist1d", "train_subset": 500, "batch_size": 32},
            "model": {"architecture": "cnn", "hidden_sizes": [32, 32]},
            "dropout_type": "spatial",
            "epochs": 40,
        },
    }
    rates = [0.0, 0.2, 0.5]
    for title, setup in setups.items():
        cells = [
            (norm, rate, seed)
            for norm in ("none", "batch_norm")
            for rate in rates
            for seed in range(seeds)
        ]
        payloads = [
            {
                "dataset": setup["dataset"],
                "model": {
                    **setup["model"],
                    "normalization": {"type": norm},
                    "dropout": {"rate": rate, "type": setup["dropout_type"]},
                },
                "optimizer": {"type": "adam", "lr": 0.001},
                "epochs": setup["epochs"],
                "seed": seed,
            }
            for norm, rate, seed in cells
        ]
        results = dict(zip(cells, pool.map(run_one, payloads), strict=True))
        print(f"\n### 2. Dropout x normalization: {title} (Adam 1e-3)\n")
        print(
            "| normalization | dropout | best val acc | final val acc "
            "| final train acc (eval mode) | final gap (val - train loss) |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for norm in ("none", "batch_norm"):
            for rate in rates:
                runs = [results[norm, rate, seed]["epochs"] for seed in range(seeds)]
                print(
                    f"| {norm} | {rate:g} "
                    f"| {_mean(max(e['val_accuracy'] for e in r) for r in runs)} "
                    f"| {_mean(r[-1]['val_accuracy'] for r in runs)} "
                    f"| {_mean(r[-1]['train_eval_accuracy'] for r in runs)} "
                    f"| {_mean(r[-1]['generalization_gap'] for r in runs)} |"
                )


def spread_study(pool: ProcessPoolExecutor, seeds: int) -> None:
    norms = ["none", "batch_norm", "layer_norm"]
    cells = [(norm, seed) for norm in norms for seed in range(seeds)]
    payloads = [
        {
            "dataset": {"name": "digits", "batch_size": 64},
            "model": {"hidden_sizes": [64] * 6, "normalization": {"type": norm}},
            "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9},
            "epochs": 1,
            "seed": seed,
        }
        for norm, seed in cells
    ]
    results = dict(zip(cells, pool.map(run_one, payloads), strict=True))
    print("\n### 3. Pre-activation standard deviation per layer after one epoch")
    print("(MLP with six hidden layers of 64 on digits, SGD 0.1; probe batch, eval mode)\n")
    print("| normalization | " + " | ".join(f"layer {i}" for i in range(1, 7)) + " |")
    print("| --- |" + " ---: |" * 6)
    for norm in norms:
        per_layer: list[list[float]] = [[] for _ in range(6)]
        for seed in range(seeds):
            layers = results[norm, seed]["epochs"][-1]["layers"]
            spreads = [
                layer["pre_activation_std"] for layer in layers if "pre_activation_std" in layer
            ]
            for i, spread in enumerate(spreads[:6]):
                per_layer[i].append(spread)
        cells_text = [f"{statistics.mean(v):.2f}" if v else "-" for v in per_layer]
        print(f"| {norm} | " + " | ".join(cells_text) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, CPU, {args.workers} worker processes, {args.seeds} seeds")
    with ProcessPoolExecutor(args.workers) as pool:
        learning_rate_study(pool, args.seeds)
        dropout_study(pool, args.seeds)
        spread_study(pool, args.seeds)


if __name__ == "__main__":
    main()
