"""Takes README's dashboard screenshots (docs/screenshots/*.png) from a live `trainsvc up`.

    .venv/bin/python -m tests.dashboard.screenshots

Starts the service in a temporary folder, trains a small study and a few jobs, and photographs
the pages at laptop and phone widths with Debian's chromium.
"""

import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import sync_playwright

from tests.dashboard.conftest import CHROMIUM, CHROMIUM_ARGS
from tests.support.processes import Processes, wait_until

OUT = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
STUDY = {
    "name": "norm-x-dropout",
    "base": {
        "dataset": {"name": "digits", "train_subset": 300, "label_noise": 0.1},
        "model": {"architecture": "mlp", "hidden_sizes": [128, 64]},
        "optimizer": {"type": "sgd", "lr": 0.05, "momentum": 0.9},
        "epochs": 20,
        "device": "cpu",
        "tags": {"team": "vision"},
    },
    "grid": {
        "model.normalization.type": ["none", "batch_norm"],
        "model.dropout.rate": [0.0, 0.5],
        "seed": [0, 1, 2],
    },
}
JOB = {
    "name": "bn-digits",
    "dataset": {"name": "digits", "batch_size": 32},
    "model": {
        "architecture": "mlp",
        "hidden_sizes": [128, 64, 32],
        "normalization": {"type": "batch_norm"},
        "dropout": {"rate": 0.2},
    },
    "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9},
    "epochs": 25,
    "device": "cpu",
    "tags": {"team": "vision", "owner": "ada"},
}


def _shoot(browser: Any, url: str, name: str, width: int, ready: str) -> None:
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    page.goto(url)
    page.wait_for_function(ready, timeout=60_000)
    time.sleep(0.5)  # the last frame of the charts
    # The phone's jobs list: the first screenful, as a person holds it (the rest is more cards).
    page.screenshot(path=str(OUT / f"{name}.png"), full_page=name != "phone-jobs")
    context.close()
    print(f"wrote docs/screenshots/{name}.png")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        processes = Processes(Path(workdir), {})
        try:
            url = processes.api("up")
            client = httpx.Client(base_url=url, timeout=30)
            job_id = client.post("/v1/jobs", json=JOB).json()["id"]
            study = client.post("/v1/studies", json=STUDY).json()
            wait_until(
                lambda: client.get(f"/v1/studies/{study['id']}").json()["ended"], 600, "the study"
            )
            cancelled = client.post("/v1/jobs", json={**JOB, "name": "too-long", "epochs": 400})
            client.post(f"/v1/jobs/{cancelled.json()['id']}/cancel")
            running = client.post(
                "/v1/jobs",
                json={
                    **JOB,
                    "name": "ln-digits-long",
                    "epochs": 300,
                    "model": {**JOB["model"], "normalization": {"type": "layer_norm"}},
                },
            ).json()["id"]
            wait_until(
                lambda: client.get(f"/v1/jobs/{running}").json()["progress"]["epoch"] >= 40,
                300,
                "the long job to be well on",
            )
            queued = client.post("/v1/jobs", json={**JOB, "name": "waiting"})
            assert queued.status_code == 201
            study_jobs = client.get(
                "/v1/jobs", params={"study_id": study["id"], "limit": 12}
            ).json()
            seed0 = [j["id"] for j in study_jobs["items"] if j["grid_point"]["seed"] == 0]
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                table = "() => document.querySelectorAll('#jobs-table tbody tr').length > 5"
                charts = "() => window.__charts && window.__charts.layer_grad_norm"
                _shoot(browser, f"{url}/#/jobs", "jobs", 1280, table)
                _shoot(browser, f"{url}/#/jobs/{job_id}", "job", 1280, charts)
                _shoot(
                    browser,
                    f"{url}/#/studies/{study['id']}",
                    "study",
                    1280,
                    "() => document.querySelector('img[data-plot]')"
                    " && !document.querySelector('.plots .empty')"
                    " && [...document.querySelectorAll('img[data-plot]')]"
                    ".every((img) => img.complete && img.naturalWidth > 0)",
                )
                _shoot(
                    browser,
                    f"{url}/#/compare?jobs={','.join(seed0)}",
                    "compare",
                    1280,
                    "() => window.__charts && window.__charts.compare_generalization_gap",
                )
                _shoot(browser, f"{url}/#/jobs", "phone-jobs", 390, table)
                _shoot(browser, f"{url}/#/jobs/{running}", "phone-job", 390, charts)
                _shoot(
                    browser,
                    f"{url}/#/studies/{study['id']}",
                    "phone-study",
                    390,
                    "() => document.querySelector('#configurations tbody tr')",
                )
                browser.close()
        finally:
            processes.stop_all()


if __name__ == "__main__":
    main()
