"""Run the study presets through the API and save their reports: the source of docs/findings.md.

Starts a real `trainsvc up` (embedded SQLite database and broker in a temporary folder, auth
off, a worker of --concurrency processes with one thread each), or uses a running service
given by --url (with TRAINSVC_API_KEY if its keys are on). Submits each preset as
`POST /v1/studies {"preset": ..., overrides}`, all at once so the worker is never idle, waits
for them, and saves into --out for each preset: the report (`<preset>.json`), its
configuration table (`<preset>.csv`) and its plots (`<preset>-<plot>.png`); for
depth-signal also the per-layer pre-activation spread from each job's metrics. Then prints
the configuration tables, the largest stable learning rates and the effects as markdown.

    PYTHONPATH=. .venv/bin/python benchmarks/run_presets.py [--out docs/findings]
        [--presets dropout-overfitting,batchnorm-learning-rate,...] [--seeds 0,1]
        [--concurrency 2] [--url http://127.0.0.1:8000]
    PYTHONPATH=. .venv/bin/python benchmarks/run_presets.py --print-only   (saved reports)
"""

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from benchmarks.service_process import api_headers, embedded_service

# The overrides each preset is run with here: a 2-core shared machine, about half an hour in
# all. The dropout preset keeps its full length (it must train long enough to overfit) and
# gets a third seed: it is the one whose effect is small enough to need it.
OVERRIDES: dict[str, dict[str, Any]] = {
    "dropout-overfitting": {"seeds": [0, 1, 2]},
    "batchnorm-learning-rate": {"epochs": 10},
    "normalization-zoo": {},
    "depth-signal": {},
}
# Studies that are not presets, run alongside as a contrast: the dropout preset's earlier
# regime (200 samples, 20% of their labels noisy), where dropout did not narrow the final gap.
CONTRASTS: dict[str, dict[str, Any]] = {
    "dropout-label-noise": {
        "base": {
            "dataset": {"name": "digits", "train_subset": 200, "label_noise": 0.2},
            "model": {"architecture": "mlp", "hidden_sizes": [1024, 1024]},
            "optimizer": {"type": "adam", "lr": 0.001},
            "epochs": 100,
        },
        "grid": {"model.dropout.rate": [0.0, 0.5], "seed": [0, 1, 2]},
    },
}
# Submitted in this order, so the studies that matter most finish first.
ORDER = [
    "dropout-overfitting",
    "dropout-label-noise",
    "batchnorm-learning-rate",
    "normalization-zoo",
    "depth-signal",
]
POLL_SECONDS = 5.0
RETRIES_ON_503 = 30


def _mean_sd(aggregate: dict[str, Any], digits: int = 3) -> str:
    if aggregate["mean"] is None:
        return "-"
    if aggregate["std"] is None:
        return f"{aggregate['mean']:.{digits}f}"
    return f"{aggregate['mean']:.{digits}f} ± {aggregate['std']:.{digits}f}"


def _short(axis: str) -> str:
    parts = axis.split(".")
    return parts[-2] if len(parts) > 1 and parts[-1] in ("type", "rate") else parts[-1]


def _value(value: Any) -> str:
    if isinstance(value, list):
        return (
            "x".join(str(v) for v in value) if len(set(value)) > 1 else f"{len(value)}x{value[0]}"
        )
    return str(value)


def configuration_table(report: dict[str, Any]) -> str:
    """The report's configurations as a markdown table, mean ± sd over seeds."""
    axes = [axis for axis in report["axes"] if axis != "seed"]
    header = [
        *(_short(axis) for axis in axes),
        "n",
        "best val acc",
        "final val acc",
        "gap at best epoch",
        "final gap",
        "epochs to target",
        "diverged",
        "s/epoch",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in report["configurations"]:
        to_target = row["epochs_to_target"]
        reached = _mean_sd(to_target, 1)
        if to_target["never_reached"]:
            reached += f" ({to_target['never_reached']} never)"
        cells = [
            *(_value(row["configuration"].get(axis)) for axis in axes),
            str(row["succeeded"]),
            _mean_sd(row["best_val_accuracy"]),
            _mean_sd(row["final_val_accuracy"]),
            _mean_sd(row["generalization_gap_at_best"]),
            _mean_sd(row["generalization_gap_final"]),
            reached,
            f"{row['diverged']}/{row['jobs']}",
            _mean_sd(row["seconds_per_epoch"], 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stable_lr_table(report: dict[str, Any]) -> str | None:
    stable = report.get("max_stable_lr")
    if not stable:
        return None
    rows = stable["configurations"]
    axes = list(rows[0]["configuration"]) if rows else []
    lines = [
        "| "
        + " | ".join([*(_short(a) for a in axes), "largest stable lr", "why not higher"])
        + " |",
        "|" + " --- |" * (len(axes) + 2),
    ]
    for row in rows:
        higher = [
            v for v in row["by_lr"] if not v["stable"] and (row["max_stable_lr"] or 0) < v["lr"]
        ]
        why = f"lr {higher[0]['lr']}: {higher[0]['reason']}" if higher else "-"
        lines.append(
            "| "
            + " | ".join(
                [*(_value(row["configuration"][a]) for a in axes), str(row["max_stable_lr"]), why]
            )
            + " |"
        )
    return "\n".join(lines)


def effects_table(report: dict[str, Any]) -> str:
    """Each effect's estimate, 95 % bootstrap interval and n, for the three measures."""
    lines = [
        "| against baseline | pairs | epochs-to-target ratio | best val acc difference "
        "| final gap difference |",
        "| --- | ---: | --- | --- | --- |",
    ]

    def cell(estimate: dict[str, Any], digits: int) -> str:
        if estimate["estimate"] is None:
            return "-"
        return (
            f"{estimate['estimate']:+.{digits}f} [{estimate['ci_low']:+.{digits}f}, "
            f"{estimate['ci_high']:+.{digits}f}] n={estimate['n']}"
        )

    for effect in report["effects"]:
        ratio = effect["epochs_to_target"]
        ratio_cell = (
            "-"
            if ratio["estimate"] is None
            else f"{ratio['estimate']:.2f}x [{ratio['ci_low']:.2f}, {ratio['ci_high']:.2f}] "
            f"n={ratio['n']}"
        )
        lines.append(
            f"| {_short(effect['axis'])} {effect['value']} vs {effect['baseline']} "
            f"| {effect['pairs']} | {ratio_cell} | {cell(effect['best_val_accuracy'], 3)} "
            f"| {cell(effect['generalization_gap'], 3)} |"
        )
    return "\n".join(lines)


def depth_table(layers: dict[str, Any]) -> str:
    """Pre-activation standard deviation per layer at the first and last epoch, mean over seeds."""
    lines = [
        "| depth | normalization | epoch | pre-activation std, layer 1 → last |",
        "| --- | --- | ---: | --- |",
    ]
    for row in layers["configurations"]:
        for epoch, spreads in (("first", row["first"]), ("last", row["last"])):
            values = " ".join(f"{value:.2f}" for value in spreads)
            lines.append(f"| {row['depth']} | {row['normalization']} | {epoch} | {values} |")
    return "\n".join(lines)


def _depth_signal(client: httpx.Client, study: dict[str, Any]) -> dict[str, Any]:
    """Per configuration, the pre-activation std of each hidden layer at the first and last
    epoch (the probe batch, eval mode), averaged over seeds, from each job's metrics."""
    groups: dict[tuple[int, str], list[tuple[list[float], list[float]]]] = {}
    for job in study["jobs"]:
        if job["status"] != "succeeded":
            continue
        epochs = _get(client, f"/v1/jobs/{job['id']}/metrics").json()["epochs"]

        def spreads(epoch: dict[str, Any]) -> list[float]:
            return [
                layer["pre_activation_std"]
                for layer in epoch.get("layers", [])
                if layer.get("kind") == "activation"
            ]

        point = job["grid_point"]
        key = (len(point["model.hidden_sizes"]), point["model.normalization.type"])
        groups.setdefault(key, []).append((spreads(epochs[0]), spreads(epochs[-1])))
    rows = []
    for (depth, normalization), runs in sorted(groups.items()):
        first = [statistics.mean(values) for values in zip(*(r[0] for r in runs), strict=True)]
        last = [statistics.mean(values) for values in zip(*(r[1] for r in runs), strict=True)]
        rows.append(
            {
                "depth": depth,
                "normalization": normalization,
                "seeds": len(runs),
                "first": first,
                "last": last,
            }
        )
    return {"configurations": rows}


def _wait_and_save(client: httpx.Client, studies: dict[str, dict[str, Any]], out: Path) -> None:
    """Poll until every study has ended, saving each one's report as soon as it has."""
    started = time.monotonic()
    pending = dict(studies)
    while pending:
        time.sleep(POLL_SECONDS)
        progress = []
        for name, study in list(pending.items()):
            current = _get(client, f"/v1/studies/{study['id']}").json()
            counts = current["counts"]
            done = sum(counts.get(s, 0) for s in ("succeeded", "failed", "cancelled"))
            progress.append(f"{name} {done}/{len(current['jobs'])} {json.dumps(counts)}")
            if current["ended"]:
                del pending[name]
                _save(client, name, {**current, "request": study["request"]}, out)
        print(f"[{time.monotonic() - started:6.0f} s] " + ", ".join(progress), flush=True)


def _get(client: httpx.Client, url: str, **params: Any) -> httpx.Response:
    """GET, retried while the service answers 503: the embedded SQLite database is briefly
    locked while the workers write, and the service says "retry shortly"."""
    for _ in range(RETRIES_ON_503):
        response = client.get(url, params=params)
        if response.status_code != 503:
            return response.raise_for_status()
        time.sleep(float(response.headers.get("Retry-After", "1")))
    return response.raise_for_status()


def _save(client: httpx.Client, name: str, study: dict[str, Any], out: Path) -> None:
    base = f"/v1/studies/{study['id']}/report"
    report = _get(client, base).json()
    report["request"] = study.get("request")
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    csv = _get(client, base, format="csv").text
    (out / f"{name}.csv").write_text(csv)
    for plot, url in report["plots"].items():
        png = _get(client, url).content
        (out / f"{name}-{plot}.png").write_bytes(png)
    if name == "depth-signal":
        layers = _depth_signal(client, study)
        (out / f"{name}-layers.json").write_text(json.dumps(layers, indent=1) + "\n")


def print_reports(out: Path, names: list[str]) -> None:
    for name in names:
        path = out / f"{name}.json"
        if not path.exists():
            continue
        report = json.loads(path.read_text())
        print(f"\n## {name}\n")
        print(f"request: {json.dumps(report.get('request'))}")
        print(f"counts: {json.dumps(report['counts'])}")
        target = report["target"]
        if target["val_accuracy"] is not None:
            print(f"target val accuracy: {target['val_accuracy']:.3f} ({target['source']})\n")
        print(configuration_table(report))
        stable = stable_lr_table(report)
        if stable:
            print(f"\n{stable}")
        if report["effects"]:
            print(f"\n{effects_table(report)}\n")
            for effect in report["effects"]:
                for measure in ("epochs_to_target", "best_val_accuracy", "generalization_gap"):
                    print(f"- {effect[measure]['reading']}")
        layers = out / f"{name}-layers.json"
        if layers.exists():
            print(f"\n{depth_table(json.loads(layers.read_text()))}")


@contextlib.contextmanager
def _service(url: str | None, concurrency: int) -> Iterator[str]:
    if url:
        yield url
    else:
        with embedded_service(concurrency) as started:
            yield started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/findings")
    parser.add_argument("--presets", default=",".join(ORDER))
    parser.add_argument("--seeds", default="0,1", help="seeds for presets that set none here")
    parser.add_argument("--concurrency", type=int, default=2, help="worker processes")
    parser.add_argument("--url", default=None, help="a running service instead of `trainsvc up`")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds for all studies")
    parser.add_argument("--print-only", action="store_true", help="print the saved reports")
    args = parser.parse_args()
    names = args.presets.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.print_only:
        print_reports(out, names)
        return
    seeds = [int(seed) for seed in args.seeds.split(",")]

    started = time.monotonic()
    with (
        _service(args.url, args.concurrency) as url,
        httpx.Client(base_url=url, timeout=120, headers=api_headers()) as client,
    ):
        known = {
            p["name"] for p in client.get("/v1/studies/presets").raise_for_status().json()["items"]
        }
        unknown = set(names) - known - set(CONTRASTS)
        if unknown:
            sys.exit(f"unknown presets: {', '.join(sorted(unknown))}; the service has {known}")
        studies = {}
        for name in names:
            body = (
                {"name": name, **CONTRASTS[name]}
                if name in CONTRASTS
                else {"preset": name, "name": name, "seeds": seeds, **OVERRIDES.get(name, {})}
            )
            response = client.post("/v1/studies", json=body)
            if response.status_code >= 400:
                sys.exit(f"{name}: {response.status_code} {response.text}")
            studies[name] = {**response.json(), "request": body}
            print(f"{name}: study {studies[name]['id']}, {len(studies[name]['jobs'])} jobs")
        _wait_and_save(client, studies, out)
    print(f"\nall presets done in {time.monotonic() - started:.0f} s; saved under {out}/")
    print_reports(out, names)


if __name__ == "__main__":
    main()
