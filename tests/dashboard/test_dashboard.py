"""The dashboard in a real browser (headless Chromium) against a live service.

`trainsvc up` (SQLite, a worker, no keys) for what a person watches: a submitted job appears in
the table and turns succeeded without a reload, its page draws every epoch as it trains, cancel
works, a study shows its table, compare overlays jobs. `trainsvc serve` with keys on for the key
prompt. Each test opens its own browser context, so sessionStorage starts empty.
"""

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.factories import spec_payload
from tests.support.processes import Processes, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

# Small batches: a few hundred steps an epoch, so a page opened at submit sees epochs arrive.
SLOW_EPOCHS = 10
SPEC = spec_payload(
    name="watched",
    dataset={"name": "digits", "batch_size": 8},
    model={
        "architecture": "mlp",
        "hidden_sizes": [32, 16],
        "normalization": {"type": "batch_norm"},
    },
    epochs=SLOW_EPOCHS,
    device="cpu",
    # One probe of each kind per epoch (the first step of each): the page's "why" charts.
    diagnostics={
        "landscape": {"every_steps": 1000},
        "covariate_shift": {"every_steps": 1000},
        "gradient_noise": {"every_steps": 1000},
    },
)
PROBE_CHARTS = ("landscape", "landscape_relative", "covariate_shift", "gradient_noise")
STUDY = {
    "name": "norm-study",
    "base": {
        "dataset": {"name": "digits"},
        "model": {"architecture": "mlp", "hidden_sizes": [16]},
        "epochs": 3,
        "device": "cpu",
    },
    "grid": {"model.normalization.type": ["none", "batch_norm"], "seed": [0, 1]},
}
TIMEOUT_MS = 120_000


@pytest.fixture
def page(chromium: Any) -> Iterator[Any]:
    """A fresh page; the test fails on any uncaught error in the page's scripts, and on
    anything the service's Content-Security-Policy refused."""
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # The service's Content-Security-Policy: whatever it blocks breaks the page, silently.
    page.on(
        "console",
        lambda message: (
            errors.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    page.set_default_timeout(TIMEOUT_MS)
    yield page
    context.close()
    assert errors == [], errors


def _create_key(processes: Processes, tenant: str) -> str:
    """A key made with `trainsvc keys create`, as an operator makes one."""
    created = subprocess.run(
        [sys.executable, "-m", "app.cli", "keys", "create", "--tenant", tenant],
        check=True,
        cwd=processes.workdir,
        env=processes.env,
        capture_output=True,
        text=True,
    )
    return created.stdout.strip().splitlines()[-1]


class Outage:
    """A route handler that fails each request, as a service that is down does, while `on`."""

    def __init__(self) -> None:
        self.on = True

    def __call__(self, route: Any) -> None:
        if self.on:
            route.abort()
        else:
            route.continue_()


def _submit(url: str, spec: dict[str, Any], headers: dict[str, str] | None = None) -> str:
    response = httpx.post(f"{url}/v1/jobs", json=spec, headers=headers or {}, timeout=10)
    assert response.status_code == 201, response.text
    job_id: str = response.json()["id"]
    return job_id


def _status(url: str, job_id: str) -> str:
    status: str = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()["status"]
    return status


def test_the_jobs_table_shows_a_submitted_job_and_follows_it_to_succeeded(
    processes: Processes, page: Any
) -> None:
    url = processes.api("up")
    page.goto(f"{url}/#/jobs")
    page.wait_for_selector("#live.state-live")  # the event stream is connected
    page.wait_for_selector("text=No jobs yet")  # the first page is loaded, and empty
    assert page.locator("#jobs-table tbody tr").count() == 0
    assert not page.is_visible("#key-dialog")  # auth off: no prompt
    page.evaluate("window.__sameDocument = true")  # gone if anything reloads the page

    job_id = _submit(url, SPEC)
    row = page.locator(f'tr[data-job-id="{job_id}"]')
    row.wait_for()
    assert "watched" in row.inner_text()
    assert "batch norm" in row.locator(".col-normalization").inner_text()
    page.wait_for_selector(f'tr[data-job-id="{job_id}"][data-status="succeeded"]')
    # The summary came with the job: the best validation accuracy, as a percentage.
    page.wait_for_function(
        f"""() => /\\d+\\.\\d %/.test(document.querySelector(
            'tr[data-job-id="{job_id}"] .col-best').textContent)"""
    )
    assert f"{SLOW_EPOCHS}/{SLOW_EPOCHS}" in row.locator(".col-progress").inner_text()
    assert page.evaluate("window.__sameDocument") is True
    assert _status(url, job_id) == "succeeded"


def test_the_job_page_draws_every_epoch_as_it_trains(processes: Processes, page: Any) -> None:
    url = processes.api("up")
    # Every value the loss chart's data-points takes, from the page's first script on.
    page.add_init_script(
        """window.__seenPoints = [];
        new MutationObserver((changes) => {
          for (const change of changes) {
            if (change.target.dataset && change.target.dataset.chart === "loss") {
              window.__seenPoints.push(Number(change.target.dataset.points));
            }
          }
        }).observe(document,
                   {subtree: true, attributes: true, attributeFilter: ["data-points"]});"""
    )
    job_id = _submit(url, SPEC)
    page.goto(f"{url}/#/jobs/{job_id}")
    page.wait_for_selector("h1 .badge.succeeded")
    page.wait_for_function(
        f"() => window.__charts.loss && window.__charts.loss.data[0].length === {SLOW_EPOCHS}"
    )
    trained = page.locator("dl.facts .fact", has=page.locator("dt", has_text="Trained"))
    assert trained.locator("dd").inner_text() == "alone"  # a probed job never packs
    epochs = list(range(1, SLOW_EPOCHS + 1))
    for name in (
        "loss",
        "accuracy",
        "gap",
        "grad_norm",
        "activation_std",
        "layer_grad_norm",
        *PROBE_CHARTS,
    ):
        page.wait_for_function(
            f"() => window.__charts.{name} && window.__charts.{name}.data[0].length === "
            f"{SLOW_EPOCHS}"
        )
        data = page.evaluate(f"window.__charts.{name}.data")
        assert data[0] == epochs, name
        if name == "gradient_noise":
            # The noise scale's |G|^2 estimate can come out at or below 0 from one noisy
            # probe (it is unbiased, not positive): that epoch has no scale, and no point.
            assert any(value is not None for value in data[1]), name
        else:
            assert all(value is not None for series in data[1:] for value in series), name
    # train and validation, each a number per epoch
    assert len(page.evaluate("window.__charts.loss.data")) == 3
    assert page.get_attribute('[data-chart="accuracy"]', "data-points") == str(SLOW_EPOCHS)
    # Drawn as epochs arrived, not once at the end.
    seen = page.evaluate("window.__seenPoints")
    assert any(0 < points < SLOW_EPOCHS for points in seen), seen
    # Checkpoints with download links that answer.
    links = page.locator("#checkpoints a", has_text="Download")
    assert links.count() == 2
    href = links.first.get_attribute("href")
    assert httpx.get(f"{url}{href}", timeout=10).content[:8]  # a safetensors header


def test_the_cancel_button_cancels_the_job(processes: Processes, page: Any) -> None:
    url = processes.api("up")
    long_job = {
        **SPEC,
        "name": "long",
        "epochs": 500,
        "dataset": {"name": "digits", "batch_size": 4},
    }
    job_id = _submit(url, long_job)
    page.goto(f"{url}/#/jobs/{job_id}")
    page.click("#cancel-job")
    page.click("#confirm-cancel")
    page.wait_for_selector("h1 .badge.cancelled")
    assert _status(url, job_id) == "cancelled"
    assert page.locator("#cancel-job").count() == 0  # nothing left to cancel


def _assert_fits_a_phone(page: Any) -> None:
    """At a phone's width no table scrolls sideways: each row reads as a card of labelled
    lines. (Only the jobs table did; the others showed a few columns of a wider table.)"""
    page.set_viewport_size({"width": 390, "height": 900})
    # The charts redraw at the new width when their ResizeObserver fires: a frame or two.
    page.wait_for_function("() => document.documentElement.scrollWidth <= 390", timeout=5_000)
    overflowing = page.evaluate(
        """() => [...document.querySelectorAll('.table-wrap')]
              .filter((wrap) => wrap.scrollWidth > wrap.clientWidth + 1)
              .map((wrap) => wrap.querySelector('table'))
              .map((table) => table.id || table.className)"""
    )
    assert overflowing == []
    labels = page.evaluate(
        """() => [...document.querySelectorAll('table.cards tbody td[data-label]')]
              .filter((td) => td.dataset.label)
              .map((td) => [td.dataset.label, getComputedStyle(td, '::before').content])"""
    )
    assert labels, "no labelled cells"
    assert all(content == f'"{label}"' for label, content in labels), labels
    page.set_viewport_size({"width": 1280, "height": 900})


def test_a_study_page_shows_its_table_and_compare_overlays_picked_jobs(
    processes: Processes, page: Any
) -> None:
    url = processes.api("up")
    study = httpx.post(f"{url}/v1/studies", json=STUDY, timeout=30).json()
    study_id = study["id"]
    wait_until(
        lambda: httpx.get(f"{url}/v1/studies/{study_id}", timeout=10).json()["ended"],
        180,
        "the study to end",
    )
    page.goto(f"{url}/#/studies/{study_id}")
    rows = page.locator("#configurations tbody tr")
    rows.first.wait_for()
    assert rows.count() == 2
    table = page.inner_text("#configurations")
    assert "batch_norm" in table
    assert "2 of 2" in table
    # What an epoch took, and that those seconds are a pack's: each configuration's two seeds
    # trained as one pack, and the note under the table says what that does to the timings.
    header = [cell.inner_text() for cell in page.locator("#configurations thead th").all()]
    assert header[-2:] == ["Seconds per epoch", "Packed"]
    for row in rows.all():
        cells = [cell.inner_text() for cell in row.locator("td").all()]
        assert re.fullmatch(r"\d+ ms( ± \d+ ms)?|\d+\.\d s( ± .+)?", cells[-2]), cells
        assert cells[-1] == "2"
    assert "trained in packs" in page.inner_text("#seconds-note")
    # The server's learning-curve plot (a band over seeds), fetched as a blob and shown.
    page.wait_for_function(
        """() => { const img = document.querySelector('img[data-plot="learning_curves"]');
                   return img && img.complete && img.naturalWidth > 0; }"""
    )
    _assert_fits_a_phone(page)

    # Its jobs trained in packs (one per normalization: a pack shares its computation), and
    # a job's page says in which.
    jobs = httpx.get(f"{url}/v1/jobs", params={"study_id": study_id}, timeout=10).json()["items"]
    packed = next(job for job in jobs if job["pack"])
    page.goto(f"{url}/#/jobs/{packed['id']}")
    page.wait_for_selector("h1 .badge.succeeded")
    trained = page.locator("dl.facts .fact", has=page.locator("dt", has_text="Trained"))
    assert trained.locator("dd").inner_text() == f"in pack {packed['pack'][:8]}"
    page.locator("#checkpoints tbody tr").first.wait_for()
    _assert_fits_a_phone(page)
    page.goto(f"{url}/#/studies/{study_id}")
    rows.first.wait_for()

    # From the study's jobs, tick two and compare them.
    page.click("text=see its jobs")
    page.locator("#jobs-table tbody tr").nth(3).wait_for()
    assert page.locator("#jobs-table tbody tr").count() == 4
    picked = [
        page.locator("#jobs-table tbody tr").nth(i).get_attribute("data-job-id") for i in (0, 3)
    ]
    for job_id in picked:
        page.check(f'tr[data-job-id="{job_id}"] input[type=checkbox]')
    page.click("#compare-selected")
    page.wait_for_function(
        "() => window.__charts.compare_val_accuracy "
        "&& window.__charts.compare_val_accuracy.data.length === 3"
    )
    data = page.evaluate("window.__charts.compare_val_accuracy.data")
    assert data[0] == [1, 2, 3]
    assert page.locator("#compared tbody tr").count() == 2
    _assert_fits_a_phone(page)
    assert set(re.findall(r"#/compare\?jobs=([\w,-]+)", page.url)[0].split(",")) == set(picked)


def test_a_study_with_no_succeeded_run_says_it_has_no_plots_yet(
    processes: Processes, page: Any
) -> None:
    processes.migrate()
    url = processes.api("serve")  # no worker: its jobs stay queued
    study = httpx.post(f"{url}/v1/studies", json=STUDY, timeout=30).json()
    page.goto(f"{url}/#/studies/{study['id']}")
    page.locator("#configurations tbody tr").first.wait_for()
    assert "No plots yet" in page.inner_text(".plots")
    assert page.locator(".plots figure").count() == 0


def test_with_keys_on_the_page_asks_for_a_key_once(processes: Processes, page: Any) -> None:
    processes.migrate()
    key = _create_key(processes, "acme")
    processes.env["TRAINSVC_AUTH"] = "on"
    url = processes.api("serve")
    job_id = _submit(url, SPEC, {"Authorization": f"Bearer {key}"})

    sent: list[str | None] = []
    page.on(
        "request",
        lambda request: (
            sent.append(request.headers.get("authorization")) if "/v1/" in request.url else None
        ),
    )
    page.goto(f"{url}/#/jobs")
    page.wait_for_selector("#key-dialog[open]")
    assert "needs an API key" in page.inner_text("#key-dialog")
    # A wrong key is refused and asked for again.
    page.fill("#key-input", "tsk_" + "x" * 43)
    page.click("#key-form button[type=submit]")
    page.wait_for_function(
        "() => document.querySelector('#key-dialog').open "
        "&& document.querySelector('#key-reason').textContent.includes('refused')"
    )
    page.fill("#key-input", key)
    page.click("#key-form button[type=submit]")
    page.locator(f'tr[data-job-id="{job_id}"]').wait_for()
    page.wait_for_selector("#live.state-live")  # the event stream sends the key too
    assert not page.is_visible("#key-dialog")

    # Kept for the browser session: a reload asks nothing.
    sent.clear()
    page.reload()
    page.locator(f'tr[data-job-id="{job_id}"]').wait_for()
    page.wait_for_selector("#live.state-live")
    assert not page.is_visible("#key-dialog")
    assert sent
    assert all(header == f"Bearer {key}" for header in sent), sent


def test_the_event_stream_reader_parses_split_chunks_and_resumes_after_a_drop(
    processes: Processes, page: Any
) -> None:
    processes.migrate()
    url = processes.api("serve")
    page.goto(f"{url}/#/compare")  # a page that opens no stream of its own
    page.wait_for_selector("h1")
    # A stream that ends after two events (as a dropped connection does), then a third.
    requests: list[dict[str, str]] = []

    def serve(route: Any) -> None:
        requests.append(route.request.headers)
        if len(requests) == 1:
            body = (
                ': keep-alive\n\nevent: status\ndata: {"job_id": "a", "status": "running"}\n'
                'id: 7\n\nevent: epoch\r\ndata: {"job_id": "a",\r\n'
                'data:  "epoch": 1}\r\nid: 9\r\n\r\n'
            )
        else:
            body = 'event: status\ndata: {"job_id": "a", "status": "succeeded"}\nid: 12\n\n'
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)

    page.route("**/v1/test-stream", serve)
    events = page.evaluate(
        """async () => {
          const { followEvents, EventStreamParser } = await import('/api.js');
          // Chunks split anywhere, even inside a line or between \\r and \\n.
          const parsed = [];
          const parser = new EventStreamParser((event) => parsed.push(event));
          const text = 'event: epoch\\r\\ndata: {"epoch": 2}\\r\\nid: 3\\r\\n\\r\\ndata: x\\n\\n';
          for (const piece of text.match(/[\\s\\S]{1,3}/g)) parser.push(piece);
          const followed = await new Promise((resolve) => {
            const seen = [];
            followEvents('/v1/test-stream', {
              onEvent: (event) => seen.push(event),
              done: (event) => event.data.status === 'succeeded',
              onState: (state) => state === 'ended' && resolve(seen),
            });
          });
          return { parsed, followed };
        }"""
    )
    assert events["parsed"] == [
        {"type": "epoch", "data": '{"epoch": 2}', "id": "3"},
        {"type": "message", "data": "x", "id": "3"},
    ]
    assert [(e["type"], e["id"]) for e in events["followed"]] == [
        ("status", "7"),
        ("epoch", "9"),
        ("status", "12"),
    ]
    assert events["followed"][1]["data"] == {"job_id": "a", "epoch": 1}
    assert "last-event-id" not in requests[0]
    assert requests[1]["last-event-id"] == "9"
    assert len(requests) == 2  # the job ended: no third connection


def test_a_job_or_study_page_opened_while_the_service_is_away_fills_in_when_it_is_back(
    processes: Processes, page: Any
) -> None:
    """Each said "the service did not answer" until a person reloaded it; the jobs table
    already filled in by itself."""
    url = processes.api("up")
    job_id = _submit(url, {**SPEC, "epochs": 1})
    unreachable = Outage()
    page.route(f"**/v1/jobs/{job_id}", unreachable)
    page.goto(f"{url}/#/jobs/{job_id}")
    page.wait_for_selector(".error-box")
    assert "did not answer" in page.inner_text(".error-box")
    assert "Trying again" in page.inner_text("main")
    unreachable.on = False
    page.wait_for_selector("h1 .badge")  # the job's head, drawn without a reload
    assert page.locator(".error-box").count() == 0

    # A study's report, the same.
    study = httpx.post(f"{url}/v1/studies", json=STUDY, timeout=30).json()
    unreachable.on = True
    page.route(f"**/v1/studies/{study['id']}", unreachable)
    page.goto(f"{url}/#/studies/{study['id']}")
    page.wait_for_selector(".error-box")
    assert "Trying again" in page.inner_text("main")
    unreachable.on = False
    page.locator("#configurations tbody tr").first.wait_for()
    assert page.locator(".error-box").count() == 0


def test_a_stream_the_service_refuses_as_invalid_stops_and_says_why(
    processes: Processes, page: Any
) -> None:
    """A 422 on a stream (a hand-typed ?study=notauuid) was retried for ever, the badge saying
    "reconnecting…" as if the service were down. Now it stops and says why; except a 422 on
    Last-Event-ID (the service's database was replaced), which follows from now instead."""
    processes.migrate()
    url = processes.api("serve")
    page.goto(f"{url}/#/compare")  # a page that opens no stream of its own
    page.wait_for_selector("h1")
    requests: list[dict[str, str]] = []

    def refuse(field: str) -> Any:
        def serve(route: Any) -> None:
            requests.append(route.request.headers)
            if len(requests) == 1 and field == "Last-Event-ID":
                body = 'event: status\ndata: {"job_id": "a", "status": "running"}\nid: 9\n\n'
                route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)
                return
            if field == "Last-Event-ID" and "last-event-id" not in route.request.headers:
                body = 'event: status\ndata: {"job_id": "a", "status": "succeeded"}\nid: 2\n\n'
                route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)
                return
            detail = [{"field": field, "message": "must be a UUID"}]
            route.fulfill(status=422, json={"error": "validation_error", "detail": detail})

        return serve

    follow = """async () => {
          const { followEvents } = await import('/api.js');
          return await new Promise((resolve) => {
            const states = [];
            followEvents('/v1/test-stream', {
              onEvent: () => {},
              done: (event) => event.data.status === 'succeeded',
              onState: (state, detail) => {
                states.push(detail ? `${state}: ${detail}` : state);
                if (state === 'refused' || state === 'ended') resolve(states);
              },
            });
          });
        }"""
    page.route("**/v1/test-stream", refuse("study_id"))
    states = page.evaluate(follow)
    assert states == ["refused: study_id: must be a UUID"]
    page.wait_for_timeout(1500)  # a retry would come within 0.5 s
    assert len(requests) == 1

    page.unroute("**/v1/test-stream")
    requests.clear()
    page.route("**/v1/test-stream", refuse("Last-Event-ID"))
    states = page.evaluate(follow)
    assert states[-1] == "ended"
    assert [headers.get("last-event-id") for headers in requests] == [None, "9", None]


def test_the_table_shows_a_running_jobs_best_so_far_and_recovers_from_an_outage(
    processes: Processes, page: Any
) -> None:
    url = processes.api("up")
    long_job = {**SPEC, "name": "long", "epochs": 500, "dataset": {"name": "digits"}}
    job_id = _submit(url, long_job)

    def val_accuracies() -> list[float]:
        epochs = httpx.get(f"{url}/v1/jobs/{job_id}/metrics", timeout=10).json()["epochs"]
        return [row["val_accuracy"] for row in epochs]

    wait_until(lambda: len(val_accuracies()) >= 2, 120, "two epochs")
    # The service is down (its list and its event stream unreachable) when the page opens.
    unreachable = Outage()
    page.route("**/v1/jobs?*", unreachable)
    page.route("**/v1/events*", unreachable)
    page.goto(f"{url}/#/jobs")
    page.wait_for_selector(".error-box")
    assert "did not answer" in page.inner_text(".error-box")
    before = max(val_accuracies())
    unreachable.on = False
    # Back: the table fills in by itself, without "live" over an empty table.
    cell = page.locator(f'tr[data-job-id="{job_id}"] .col-best')
    cell.wait_for()
    page.wait_for_selector("#live.state-live")
    assert page.locator(".error-box").count() == 0
    # The events bring only epochs to come: the best so far is read from the job's metrics,
    # shown at once (no epoch event is let through) and never below it.
    page.route("**/v1/events*", lambda route: route.abort())
    page.wait_for_function(
        f"""() => /\\d %/.test(document.querySelector(
            'tr[data-job-id="{job_id}"] .col-best').textContent)"""
    )
    shown = float(cell.inner_text().rstrip(" %")) / 100
    assert before - 0.0005 <= shown <= max(val_accuracies()) + 0.0005
    httpx.post(f"{url}/v1/jobs/{job_id}/cancel", timeout=10)


def test_a_mistyped_id_and_an_effect_without_an_interval_read_as_a_person_expects(
    processes: Processes, page: Any
) -> None:
    processes.migrate()
    url = processes.api("serve")  # no worker: nothing trains
    # A job's short id, as the table shows it, is not an id: "No such job", not raw JSON.
    page.goto(f"{url}/#/jobs/85b0669f")
    page.wait_for_selector("text=No such job")
    page.goto(f"{url}/#/studies/85b0669f")
    page.wait_for_selector("text=No such study")
    assert "[{" not in page.inner_text("main")

    # One pair: the report gives an estimate and no interval (ci_low, ci_high null).
    study = httpx.post(f"{url}/v1/studies", json=STUDY, timeout=30).json()
    report = httpx.get(f"{url}/v1/studies/{study['id']}/report", timeout=10).json()
    report["effects"] = [
        {
            "axis": "model.normalization.type",
            "value": "batch_norm",
            "baseline": "none",
            "pairs": 1,
            "epochs_to_target": {
                "estimate": 1.5,
                "ci_low": None,
                "ci_high": None,
                "n": 1,
                "kind": "ratio: baseline epochs / these epochs (above 1: fewer epochs)",
                "reading": "too few pairs to judge batch_norm on epochs to target",
            },
        }
    ]
    page.route("**/report", lambda route: route.fulfill(status=200, json=report))
    page.goto(f"{url}/#/studies/{study['id']}")
    row = page.locator("table.effects tbody tr").first
    row.wait_for()
    text = row.inner_text()
    assert "1.5\N{MULTIPLICATION SIGN} (no interval from 1 pair)" in text
    assert "\N{EN DASH}\N{MULTIPLICATION SIGN}" not in text  # no missing bounds
    assert "1 pairs" not in text
    # The estimate's point is drawn inside its cell, not over the reading beside it.
    cell = row.locator(".interval-cell").bounding_box()
    point = row.locator(".interval .point").bounding_box()
    assert cell["x"] <= point["x"]
    assert point["x"] + point["width"] <= cell["x"] + cell["width"]
    assert row.locator(".interval .range").count() == 0


def test_a_job_that_ended_before_its_first_epoch_says_none_will_come(
    processes: Processes, page: Any
) -> None:
    """An ended job without epochs read "No epochs yet: the chart fills in as the job trains",
    "Training time 0 ms" and "None yet" for checkpoints, as if it might still train."""
    processes.migrate()
    url = processes.api("serve")  # no worker: the job waits queued until it is cancelled
    job_id = _submit(url, SPEC)
    page.goto(f"{url}/#/jobs/{job_id}")
    page.wait_for_selector("h1 .badge.queued")
    page.wait_for_selector("#live.state-live")
    empty_charts = page.locator(".chart-card .empty")
    assert "fills in as the job trains" in empty_charts.first.inner_text()

    cancelled = httpx.post(f"{url}/v1/jobs/{job_id}/cancel", timeout=10)
    assert cancelled.json()["status"] == "cancelled"
    page.wait_for_selector("h1 .badge.cancelled")  # told by the event stream
    page.wait_for_function(
        "() => [...document.querySelectorAll('.chart-card .empty')].every("
        "(p) => p.textContent.includes('ended before its first'))"
    )
    page.wait_for_selector("text=None: the job ended before a checkpoint was saved.")
    training_time = page.locator(".fact", has=page.locator("dt", has_text="Training time"))
    assert training_time.locator("dd").inner_text().strip() == "\u2013"  # an en dash: no figure


def test_a_long_name_wraps_and_html_in_a_name_is_shown_as_text(
    processes: Processes, page: Any
) -> None:
    """A name of 200 characters without a space pushed every column but the name out of view
    in the jobs table (scrolled sideways), and the job's page and the compare page (its charts'
    legends) scrolled sideways, on a laptop and on a phone."""
    processes.migrate()
    url = processes.api("serve")  # no worker: the jobs stay queued
    long_name = "sweep-" + "x" * 194
    long_id = _submit(url, {**SPEC, "name": long_name, "tags": {"team": "vision-" + "y" * 80}})
    html_name = "<img src=x onerror=alert(1)><b>bold</b>"
    html_id = _submit(url, {**SPEC, "name": html_name, "tags": {"<i>k</i>": "<script>v</script>"}})
    page.on("dialog", lambda dialog: pytest.fail(f"a name ran as code: {dialog.message}"))
    for width in (1280, 390):
        page.set_viewport_size({"width": width, "height": 900})
        page.goto(f"{url}/#/jobs")
        page.locator(f'tr[data-job-id="{long_id}"]').wait_for()
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        wrap = page.locator(".table-wrap").first
        assert wrap.evaluate("(wrap) => wrap.scrollWidth <= wrap.clientWidth + 1")
        assert page.locator("#jobs-table tbody tr").first.locator(".col-best").is_visible()
        assert html_name in page.inner_text("#jobs-table")
        assert "<i>k</i>:<script>v</script>" in page.inner_text("#jobs-table")
        assert page.locator("main img, main b, main i, main script").count() == 0

        page.goto(f"{url}/#/jobs/{long_id}")
        page.wait_for_selector("h1 .badge.queued")
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        assert long_name in page.inner_text("h1")

        # Compare: the name wraps in its table and in each chart's legend; "remove" does not.
        page.goto(f"{url}/#/compare?jobs={long_id},{html_id}")
        page.locator("#compared tbody tr").nth(1).wait_for()
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        remove = page.locator("#compared a", has_text="remove").first
        assert remove.evaluate("(link) => link.getClientRects().length") == 1


def test_a_studys_largest_stable_learning_rates_read_as_a_table(
    processes: Processes, page: Any
) -> None:
    """With the learning rate an axis, the report's max_stable_lr was printed as one line of
    raw JSON: a screenful of braces on a laptop, and a page twice a phone's width."""
    processes.migrate()
    url = processes.api("serve")  # no worker: the report's figures come from the route below
    grid = {"model.normalization.type": ["none", "batch_norm"], "optimizer.lr": [0.01, 10.0]}
    study = httpx.post(f"{url}/v1/studies", json={**STUDY, "grid": grid}, timeout=30).json()
    report = httpx.get(f"{url}/v1/studies/{study['id']}/report", timeout=10).json()
    stable = {"lr": 0.01, "stable": True, "reason": "2 seeds ended above chance, none diverged"}
    unstable = {"lr": 10.0, "stable": False, "reason": "2 of 2 seeds diverged"}
    report["max_stable_lr"] = {
        "chance_margin": 0.1,
        "configurations": [
            {
                "configuration": {"model.normalization.type": kind},
                "max_stable_lr": 0.01 if kind == "none" else None,
                "by_lr": [stable, unstable] if kind == "none" else [{**stable, "stable": False}],
            }
            for kind in ("none", "batch_norm")
        ],
    }
    page.route("**/report", lambda route: route.fulfill(status=200, json=report))
    page.goto(f"{url}/#/studies/{study['id']}")
    rows = page.locator("#stable-lrs tbody tr")
    rows.first.wait_for()
    assert rows.count() == 2
    cells = [cell.inner_text() for cell in rows.first.locator("td").all()]
    assert cells == ["none", "0.01", "0.01 stable, 10 unstable (2 of 2 seeds diverged)"]
    assert rows.nth(1).locator("td").nth(1).inner_text() == "none stable"
    assert "{" not in page.inner_text("#stable-lr")
    _assert_fits_a_phone(page)


def test_a_page_refused_a_stream_for_too_many_says_so_and_goes_live_when_one_closes(
    processes: Processes, chromium: Any
) -> None:
    """With TRAINSVC_TENANT_MAX_STREAMS streams open (another tab), a page's stream gets 429
    too_many_streams: the badge said "reconnecting…" forever, as if the service were down, and
    the page asked again every few hundred milliseconds, ignoring Retry-After."""
    processes.migrate()
    key = _create_key(processes, "acme")
    processes.env.update({"TRAINSVC_AUTH": "on", "TRAINSVC_TENANT_MAX_STREAMS": "1"})
    url = processes.api("serve")  # no worker: the job stays queued, its stream open
    job_id = _submit(url, SPEC, {"Authorization": f"Bearer {key}"})
    context = chromium.new_context(viewport={"width": 390, "height": 900})
    context.add_init_script(f"sessionStorage.setItem('trainsvc.key', '{key}')")
    context.set_default_timeout(TIMEOUT_MS)
    refused: list[float] = []
    context.on(
        "response",
        lambda response: refused.append(time.monotonic()) if response.status == 429 else None,
    )
    try:
        first = context.new_page()
        first.goto(f"{url}/#/jobs")
        first.wait_for_selector("#live.state-live")
        second = context.new_page()
        second.goto(f"{url}/#/jobs/{job_id}")
        second.wait_for_selector("#live.state-busy")
        assert "too many tabs" in second.inner_text("#live")
        assert "TRAINSVC_TENANT_MAX_STREAMS" in second.get_attribute("#live", "title")
        assert second.is_visible("h1 .badge.queued")  # the page itself loaded
        second.wait_for_timeout(7_000)  # (the sync API hears responses only while it waits)
        assert len(refused) >= 3
        assert refused[2] - refused[1] >= 4  # then Retry-After: 5, not a quick backoff
        first.close()
        second.wait_for_selector("#live.state-live", timeout=15_000)
        # One tab going from page to page is no second tab: the stream the page before held
        # may be counted a moment longer, and that is no reason to say "too many".
        second.evaluate(
            """() => { window.__states = [];
                new MutationObserver(() => window.__states.push(
                  document.querySelector('#live').className)).observe(
                  document.querySelector('#live'), {attributes: true}); }"""
        )
        for _ in range(3):
            second.click("text=All jobs")
            second.wait_for_selector("#live.state-live")
            second.click(f'tr[data-job-id="{job_id}"] a.job-link')
            second.wait_for_selector("#live.state-live")
        assert not [state for state in second.evaluate("window.__states") if "busy" in state]
    finally:
        context.close()
