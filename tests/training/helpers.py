"""Small specs and runs for trainer tests: tiny models on small slices, so the matrix is quick."""

from typing import Any

from app.core.catalog import BUILTIN_DATASETS
from app.core.spec import JobSpec
from worker.training.data import PreparedData, load_builtin, prepare
from worker.training.loop import EpochResult, TrainingRun

_data_cache: dict[str, PreparedData] = {}


def make_spec(**fields: Any) -> JobSpec:
    payload: dict[str, Any] = {
        "dataset": {"name": "digits", "train_subset": 96, "batch_size": 32},
        "model": {"hidden_sizes": [8, 8]},
        "optimizer": {"type": "sgd", "lr": 0.05, "momentum": 0.9},
        "epochs": 2,
        "seed": 3,
        "device": "cpu",
    }
    payload.update(fields)
    return JobSpec.model_validate(payload)


def data_for(spec: JobSpec) -> PreparedData:
    key = spec.dataset.model_dump_json()
    if key not in _data_cache:
        info = BUILTIN_DATASETS[spec.dataset.name]
        _data_cache[key] = prepare(spec.dataset, info, load_builtin(spec.dataset))
    return _data_cache[key]


def train(spec: JobSpec, **resume: bytes | None) -> tuple[TrainingRun, list[EpochResult]]:
    run = TrainingRun(spec, data_for(spec), **resume)
    return run, list(run.epochs())


def comparable(result: EpochResult) -> dict[str, Any]:
    """An epoch's numbers without its timing, which no two runs share."""
    metrics = {k: v for k, v in result.metrics.items() if k != "epoch_seconds"}
    return {"epoch": result.epoch, **metrics, **result.diagnostics}
