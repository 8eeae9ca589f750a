"""Run the presets why-batchnorm-helps and why-dropout-helps through the service, end to end.

Starts a real `trainsvc up` (embedded SQLite database and broker, one worker) in a temporary
folder, submits both presets over HTTP with smaller epochs and seeds, waits for every job,
then downloads each study's report (JSON) and its plots (PNG) into --out and prints the probe
figures per configuration. docs/findings.md's section "Why it helps" was written from a run:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/why_study.py --out docs/why
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

STUDIES = {
    "why-batchnorm-helps": {"epochs": 8, "seeds": [0, 1]},
    "why-dropout-helps": {"epochs": 30, "seeds": [0, 1]},
}
FIGURES = [
    "loss_variation",
    "loss_variation_relative",
    "gradient_predictiveness",
    "gradient_predictiveness_relative",
    "beta_smoothness",
    "beta_smoothness_relative",
    "ics_l2_relative",
    "ics_cosine",
    "gradient_noise_scale",
]


def wait_until_up(client: httpx.Client, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            if client.get("/v1/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError("trainsvc up did not become ready")


def wait_for(client: httpx.Client, study_id: str) -> dict[str, Any]:
    while True:
        study = client.get(f"/v1/studies/{study_id}").json()
        counts = study["counts"]
        if not counts.get("queued") and not counts.get("running"):
            return study
        print(f"  {study.get('preset') or study['id']}: {counts}", flush=True)
        time.sleep(10)


def _cell(aggregate: dict[str, Any] | None) -> str:
    if not aggregate or aggregate.get("estimate") is None:
        return "-"
    return f"{aggregate['estimate']:.3g}"


def print_table(name: str, report: dict[str, Any]) -> None:
    print(f"\n### {name}\n")
    print("| configuration | ok/jobs | best val acc | " + " | ".join(FIGURES) + " |")
    print("| --- " * (3 + len(FIGURES)) + "|")
    for row in report["configurations"]:
        label = ", ".join(
            f"{k.split('.')[-2] if k.endswith(('type', 'rate')) else k.split('.')[-1]}={v}"
            for k, v in row["configuration"].items()
        )
        accuracy = row["best_val_accuracy"]["mean"]
        probes = row.get("probes", {})
        cells = [_cell(probes.get(f, {}).get("over_epochs")) for f in FIGURES]
        print(
            f"| {label} | {row['succeeded']}/{row['jobs']} | "
            f"{accuracy if accuracy is None else f'{accuracy:.3f}'} | " + " | ".join(cells) + " |"
        )
    print()
    for effect in report["effects"]:
        for figure, value in effect.get("probes", {}).items():
            if figure in FIGURES:
                print(f"- {value['reading']}")


def main(out: Path, port: int, only: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="trainsvc-why-"))
    env = {
        **os.environ,
        "TRAINSVC_DATABASE_URL": f"sqlite:///{folder / 'trainsvc.db'}",
        "TRAINSVC_BROKER_URL": f"sqla+sqlite:///{folder / 'broker.db'}",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    trainsvc = Path(sys.executable).with_name("trainsvc")
    server = subprocess.Popen(
        [str(trainsvc), "up", "--port", str(port)],
        cwd=folder,
        env=env,
        stdout=(folder / "up.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    started = time.monotonic()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            wait_until_up(client, time.monotonic() + 120)
            ids = {}
            for preset, overrides in STUDIES.items():
                if only and preset not in only:
                    continue
                response = client.post("/v1/studies", json={"preset": preset, **overrides})
                response.raise_for_status()
                ids[preset] = response.json()["id"]
                print(f"submitted {preset}: {len(response.json()['jobs'])} jobs", flush=True)
            for preset, study_id in ids.items():
                wait_for(client, study_id)
                report = client.get(f"/v1/studies/{study_id}/report").json()
                (out / f"{preset}.json").write_text(json.dumps(report, indent=1))
                for name, url in report["plots"].items():
                    png = client.get(url)
                    png.raise_for_status()
                    (out / f"{preset}-{name}.png").write_bytes(png.content)
                print_table(preset, report)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    print(f"\n{time.monotonic() - started:.0f} s in all; the service's log: {folder / 'up.log'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/why"))
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--only", nargs="*", default=[], choices=list(STUDIES))
    args = parser.parse_args()
    main(args.out, args.port, args.only)
