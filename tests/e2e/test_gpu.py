"""The CUDA path end to end: a real worker process trains a bf16 job on the GPU.

Skips without a GPU (CI has none); run it where one is: `pytest -m gpu tests/e2e`.
"""

import httpx
import pytest
import torch

from tests.e2e.walkthrough import SPEC, wait_for_status
from tests.support.processes import Processes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.e2e,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_worker_trains_on_the_gpu_in_bf16(processes: Processes) -> None:
    url = processes.api("up")  # the worker's concurrency defaults to the visible GPUs, one each
    with httpx.Client(base_url=url, timeout=10) as client:
        jobs = [
            client.post(
                "/v1/jobs", json={**SPEC, "device": device, "mixed_precision": precision}
            ).json()["id"]
            for device, precision in (("cuda", "bf16"), ("auto", "none"), ("cpu", "none"))
        ]
        done = [
            wait_for_status(client, job_id, {"succeeded", "failed"}, timeout=120) for job_id in jobs
        ]
    for job in done:
        assert job["status"] == "succeeded", job["error"]
    placements = [(job["summary"]["device"], job["summary"]["precision"]) for job in done]
    assert placements == [("cuda:0", "bf16"), ("cuda:0", "fp32"), ("cpu", "fp32")]
    # bf16 changes the arithmetic, not what is learned: every run learns digits well past chance.
    assert min(job["summary"]["best_val_accuracy"] for job in done) > 0.5
