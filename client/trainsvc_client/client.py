"""The synchronous client: `Client(base_url, api_key=...)`; see AsyncClient for asyncio."""

import builtins
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from trainsvc_client._protocol import (
    AWAY,
    Call,
    Id,
    RetryPolicy,
    base_headers,
    checked_id,
    checkpoints_of,
    ends_job,
    epochs_of,
    job_page,
    job_path,
    params,
    parsed,
    past,
    pause,
    read,
    should_retry,
    study_path,
    submit_call,
    whole_file,
)
from trainsvc_client.errors import ConnectionFailed, NotFound, WaitTimedOut, error_from_response
from trainsvc_client.models import Checkpoint, Epoch, Job
from trainsvc_client.sse import EventDecoder, ServerSentEvent

EventHandler = Callable[[ServerSentEvent], None]


class Client:
    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.retry = retry or RetryPolicy()
        self._http = httpx.Client(
            base_url=base_url, headers=base_headers(api_key), timeout=timeout, transport=transport
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- jobs ------------------------------------------------------------------------------

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> Job:
        """Submit a job. Without a key one is made, so the client's retries never submit twice."""
        return parsed(
            Job.model_validate, self._call(submit_call("/v1/jobs", spec, idempotency_key))
        )

    def get(self, job_id: Id) -> Job:
        return parsed(Job.model_validate, self._call(Call("GET", job_path(job_id))))

    def list(
        self, status: str | None = None, study_id: Id | None = None, page_size: int = 100
    ) -> Iterator[Job]:
        """Every matching job, newest first, fetched a page at a time."""
        study = None if study_id is None else checked_id(study_id, "study")
        cursor: str | None = None
        while True:
            query = params(status=status, study_id=study, limit=page_size, cursor=cursor)
            jobs, cursor = parsed(job_page, self._call(Call("GET", "/v1/jobs", params=query)))
            yield from jobs
            if not cursor:
                return

    def cancel(self, job_id: Id) -> Job:
        return parsed(Job.model_validate, self._call(Call("POST", job_path(job_id, "cancel"))))

    def metrics(self, job_id: Id, since_epoch: int | None = None) -> builtins.list[Epoch]:
        body = self._call(
            Call("GET", job_path(job_id, "metrics"), params=params(since_epoch=since_epoch))
        )
        return parsed(epochs_of, body)

    def checkpoints(self, job_id: Id) -> builtins.list[Checkpoint]:
        return parsed(checkpoints_of, self._call(Call("GET", job_path(job_id, "checkpoints"))))

    def download_checkpoint(self, job_id: Id, checkpoint_id: Id, path: str | Path) -> Path:
        """Stream a checkpoint's safetensors file to `path`, retried as any call is; `path`
        is written only once the whole file has arrived."""
        target = Path(path)
        url = job_path(job_id, "checkpoints", checked_id(checkpoint_id, "checkpoint"))
        retry = 0
        while True:
            try:
                with self._http.stream("GET", url) as response:
                    if not should_retry(self.retry, retry, response):
                        if response.status_code >= 400:
                            response.read()
                            raise error_from_response(response)
                        with whole_file(target) as out:
                            for chunk in response.iter_bytes():
                                out.write(chunk)
                        return target
                    delay = self.retry.delay(retry, response)
            except httpx.TransportError as exc:
                if not should_retry(self.retry, retry, None):
                    raise ConnectionFailed(f"GET {url}: {exc}") from exc
                delay = self.retry.delay(retry)
            time.sleep(delay)
            retry += 1

    # -- following a job ---------------------------------------------------------------------

    def events(self, job_id: Id, last_event_id: str | None = None) -> Iterator[ServerSentEvent]:
        """The job's Server-Sent Events from `last_event_id` on; ends when the server closes."""
        headers = {"Accept": "text/event-stream"}
        if last_event_id:
            headers["Last-Event-ID"] = last_event_id
        timeout = httpx.Timeout(self._http.timeout.connect, read=60.0)
        url = job_path(job_id, "events")
        with self._http.stream("GET", url, headers=headers, timeout=timeout) as response:
            if response.status_code >= 400:
                response.read()
                raise error_from_response(response)
            decoder = EventDecoder()
            for line in response.iter_lines():
                event = decoder.feed(line)
                if event is not None:
                    yield event

    def wait(
        self,
        job_id: Id,
        timeout: float | None = None,
        *,
        on_event: EventHandler | None = None,
        poll_interval: float = 2.0,
    ) -> Job:
        """Block until the job ends and return it; WaitTimedOut after `timeout` seconds.

        Follows the event stream, reconnecting with Last-Event-ID so that no event is missed or
        seen twice; where the stream is unavailable it polls the job every `poll_interval`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        last_event_id: str | None = None
        saw_end = False
        while True:
            away: BaseException | None = None
            try:
                job = self.get(job_id)
            except AWAY as exc:
                # The API is away, or over a limit, through all of get's retries (a restart, a
                # deploy): keep trying until the deadline; the stream resumes from the last event.
                if past(deadline):
                    raise
                time.sleep(pause(self.retry, poll_interval, exc, deadline))
                continue
            if job.ended:
                if on_event is not None and not saw_end:
                    # It ended while the stream was away: hand on what was missed, then return.
                    self._replay_rest(job_id, last_event_id, on_event)
                return job
            if past(deadline):
                raise WaitTimedOut(f"job {job_id} is still {job.status} after {timeout} s")
            try:
                delivered = False
                for event in self.events(job_id, last_event_id):
                    delivered = True
                    last_event_id = event.id or last_event_id
                    if on_event is not None:
                        on_event(event)
                    if ends_job(event):
                        saw_end = True
                        break
                    if past(deadline):
                        break
                if delivered:
                    continue  # the stream ended (or the job did): read the job again
                # A stream that ends with nothing in it (a proxy's empty answer) would be
                # reconnected at once, forever: poll as where there is no stream.
            except NotFound:
                # The job exists (read above), so it is the stream that is missing: an older
                # server without events. Poll instead.
                if last_event_id is not None or not self._job_exists(job_id):
                    raise
            except httpx.TransportError:
                pass  # a dropped stream: poll once, then reconnect from the last event
            except AWAY as exc:
                away = exc  # the stream refused for now (429, 503): as dropped, after its wait
            time.sleep(pause(self.retry, poll_interval, away, deadline))

    def _replay_rest(self, job_id: Id, last_event_id: str | None, on_event: EventHandler) -> None:
        """An ended job's events after `last_event_id` (its stream ends after them)."""
        try:
            for event in self.events(job_id, last_event_id):
                on_event(event)
        except (NotFound, httpx.TransportError, *AWAY):
            pass  # no stream (an older server) or none now: the job itself is the answer

    def _job_exists(self, job_id: Id) -> bool:
        try:
            self.get(job_id)
        except NotFound:
            return False
        return True

    # -- studies -----------------------------------------------------------------------------

    def create_study(self, body: dict[str, Any], idempotency_key: str | None = None) -> Any:
        return self._call(submit_call("/v1/studies", body, idempotency_key))

    def get_study(self, study_id: Id) -> Any:
        return self._call(Call("GET", study_path(study_id)))

    def study_report(self, study_id: Id, **query: Any) -> Any:
        text = query.get("format", "json") != "json"  # csv or html
        return self._call(
            Call("GET", study_path(study_id, "report"), params=params(**query), text=text)
        )

    def cancel_study(self, study_id: Id) -> Any:
        return self._call(Call("POST", study_path(study_id, "cancel")))

    # -- transport -----------------------------------------------------------------------------

    def _call(self, call: Call) -> Any:
        retry = 0
        while True:
            try:
                response = self._http.request(
                    call.method, call.path, params=call.params, json=call.json, headers=call.headers
                )
            except httpx.TransportError as exc:
                if not should_retry(self.retry, retry, None):
                    raise ConnectionFailed(f"{call.method} {call.path}: {exc}") from exc
                time.sleep(self.retry.delay(retry))
            else:
                if not should_retry(self.retry, retry, response):
                    return read(response, call.text)
                time.sleep(self.retry.delay(retry, response))
            retry += 1
