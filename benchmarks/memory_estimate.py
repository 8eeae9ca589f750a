"""The job memory estimate (app.core.spec.memory_bytes) against what one epoch takes on CPU.

The API refuses a spec whose estimate is over TRAINSVC_MAX_JOB_MEMORY_BYTES, and a worker
sizes its packs with it, so this says how far to trust it. Each spec trains one epoch in a
process of its own (one thread, float32); measured is the rise of the peak RSS from after the
data is loaded to the epoch's end. Printed: the estimate, the measurement, and their ratio.

    PYTHONPATH=. .venv/bin/python benchmarks/memory_estimate.py
"""

import json
import resource
import subprocess
import sys

SPECS = {
    "mlp [4096, 4096], digits, batch 1024": {
        "dataset": {"name": "digits", "batch_size": 1024},
        "model": {"hidden_sizes": [4096, 4096]},
    },
    "cnn [256, 256], digits, batch 512": {
        "dataset": {"name": "digits", "batch_size": 512},
        "model": {"architecture": "cnn", "hidden_sizes": [256, 256]},
    },
    "resnet [64, 128], mnist1d, batch 1024": {
        "dataset": {"name": "mnist1d", "batch_size": 1024},
        "model": {"architecture": "resnet", "hidden_sizes": [64, 128]},
    },
}


def measure(spec_json: str) -> None:
    """In a child process: one epoch of the spec; prints {estimate, measured} bytes."""
    import torch

    from app.core.catalog import BUILTIN_DATASETS
    from app.core.spec import JobSpec, memory_bytes
    from worker.training.data import load_builtin, prepare
    from worker.training.loop import TrainingRun

    torch.set_num_threads(1)
    spec = JobSpec.model_validate_json(spec_json)
    info = BUILTIN_DATASETS[spec.dataset.name]
    data = prepare(spec.dataset, info, load_builtin(spec.dataset))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    for _ in TrainingRun(spec, data).epochs():
        pass
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"estimate": memory_bytes(spec, info, 4), "measured": after - before}))


def main() -> None:
    print(f"{'spec':40} {'estimate MiB':>13} {'measured MiB':>13} {'measured/estimate':>18}")
    for name, fields in SPECS.items():
        spec = json.dumps({**fields, "epochs": 1, "device": "cpu"})
        child = [sys.executable, __file__, "--measure", spec]
        result = json.loads(subprocess.run(child, check=True, capture_output=True).stdout)
        estimate, measured = result["estimate"] / 2**20, result["measured"] / 2**20
        print(f"{name:40} {estimate:13.0f} {measured:13.0f} {measured / estimate:18.2f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        measure(sys.argv[2])
    else:
        main()
