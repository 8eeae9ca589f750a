"""Webhooks: when a job with a callback ends, POST it to the callback's URL, signed.

A delivery row is written in the transaction that ends the job, so it survives any crash after
that; the worker's sweeper sends due deliveries, retrying with backoff for a bounded time. A
receiver checks `X-Trainsvc-Signature: t=<unix time>,v1=<hex HMAC-SHA256(secret, "t.body")>`,
rejects a stale `t` (replays), and may drop a repeated `X-Trainsvc-Delivery` id (delivery is at
least once: a sender killed between the POST and recording it sends again).
"""

import hashlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.core.db import READ_ONLY, transaction
from app.core.errors import InvalidInput
from app.core.models import Job, JobCallback, WebhookDelivery, utcnow

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Trainsvc-Signature"
DELIVERY_HEADER = "X-Trainsvc-Delivery"
# A delivery being sent is leased this long; a sender that dies mid-POST is retried after it.
SENDING_LEASE_SECONDS = 60.0


@dataclass(frozen=True)
class WebhookPolicy:
    allowed_hosts: tuple[str, ...]  # empty: any host
    retry_for_seconds: float  # give a delivery up this long after the job ended
    timeout_seconds: float


def policy_from(settings: Settings) -> WebhookPolicy:
    return WebhookPolicy(
        tuple(settings.webhook_allowed_hosts),
        settings.webhook_retry_for_seconds,
        settings.webhook_timeout_seconds,
    )


def check_url(url: str, allowed_hosts: tuple[str, ...], field: str = "callback.url") -> None:
    """Only http(s) URLs, and only to the operator's allowed hosts when a list is set."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(field, "must be an http:// or https:// URL with a host")
    host = parts.hostname.lower()
    if allowed_hosts and not any(_host_matches(host, allowed) for allowed in allowed_hosts):
        raise InvalidInput(field, f"host {host!r} is not allowed (TRAINSVC_WEBHOOK_ALLOWED_HOSTS)")


def _host_matches(host: str, allowed: str) -> bool:
    allowed = allowed.lower()
    if allowed.startswith("*."):
        return host.endswith(allowed[1:])
    return host == allowed


def sign(secret: str, timestamp: int, body: bytes) -> str:
    message = f"{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify(secret: str, header: str, body: bytes, tolerance_seconds: float = 300) -> bool:
    """What a receiver does (and the tests do): a valid, recent signature."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance_seconds:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), header)


def register(session: Session, job_id: uuid.UUID, url: str, secret: str) -> None:
    session.execute(insert(JobCallback).values(job_id=job_id, url=url, secret=secret))


def enqueue_if_ended(session: Session, job_id: uuid.UUID) -> None:
    """In the transaction that ends a job: queue its delivery, if it has a callback."""
    url = session.scalar(select(JobCallback.url).where(JobCallback.job_id == job_id))
    if url is not None:
        session.execute(
            insert(WebhookDelivery).values(
                id=uuid.uuid4(),
                job_id=job_id,
                url=url,
                status="pending",
                attempts=0,
                next_attempt_at=utcnow(),
                created_at=utcnow(),
            )
        )


def list_deliveries(session: Session, job_id: uuid.UUID) -> list[WebhookDelivery]:
    query = select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
    return list(session.scalars(query.order_by(WebhookDelivery.created_at)))


def payload(job: Job) -> dict[str, Any]:
    def moment(value: Any) -> str | None:
        return value.isoformat() if value is not None else None

    return {
        "event": "job.ended",
        "job": {
            "id": str(job.id),
            "name": job.name,
            "status": str(job.status),
            "created_at": moment(job.created_at),
            "started_at": moment(job.started_at),
            "finished_at": moment(job.finished_at),
            "attempts": job.attempts,
            "progress": {"epoch": job.progress_epoch, "epochs": job.epochs},
            "summary": job.summary,
            "error": {"type": job.error_type, "message": job.error_message or ""}
            if job.error_type
            else None,
        },
    }


def send_due(factory: sessionmaker[Session], policy: WebhookPolicy, limit: int = 20) -> int:
    """Send the deliveries that are due; returns how many were attempted."""
    due = _lease_due(factory, limit)
    if not due:
        return 0  # the common case, every sweep: one indexed query, no HTTP client
    with httpx.Client(timeout=policy.timeout_seconds, follow_redirects=False) as client:
        for delivery_id in due:
            _send_one(factory, client, policy, delivery_id)
    return len(due)


def _lease_due(factory: sessionmaker[Session], limit: int) -> list[uuid.UUID]:
    now = utcnow()
    with transaction(factory) as session:
        ids = list(
            session.scalars(
                select(WebhookDelivery.id)
                .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
                .order_by(WebhookDelivery.next_attempt_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        )
        if not ids:
            return []
        # Conditional, and only what it changed counts: SQLite has no FOR UPDATE, so two
        # sweepers may select the same rows, but only one moves each row's lease forward.
        leased = session.scalars(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id.in_(ids),
                WebhookDelivery.status == "pending",
                WebhookDelivery.next_attempt_at <= now,
            )
            .values(next_attempt_at=now + timedelta(seconds=SENDING_LEASE_SECONDS))
            .returning(WebhookDelivery.id)
        )
        return list(leased)


def _send_one(
    factory: sessionmaker[Session],
    client: httpx.Client,
    policy: WebhookPolicy,
    delivery_id: uuid.UUID,
) -> None:
    with factory(execution_options=READ_ONLY) as session:
        delivery = session.get(WebhookDelivery, delivery_id)
        job = session.get(Job, delivery.job_id) if delivery is not None else None
        secret = (
            session.scalar(select(JobCallback.secret).where(JobCallback.job_id == job.id))
            if job
            else None
        )
        if delivery is None or job is None or secret is None:
            return  # the job was deleted meanwhile, and its callback and deliveries with it
        body = json.dumps(payload(job), separators=(",", ":")).encode()
        url, attempts, created_at = delivery.url, delivery.attempts, delivery.created_at
    status_code: int | None = None
    error: str | None = None
    try:
        check_url(url, policy.allowed_hosts)
        response = client.post(
            url,
            content=body,
            headers={
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign(secret, int(time.time()), body),
                DELIVERY_HEADER: str(delivery_id),
            },
        )
        status_code = response.status_code
        if not 200 <= status_code < 300:
            error = f"the receiver answered {status_code}"
    except InvalidInput as exc:
        error = exc.message
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"[:1000]
    now = utcnow()
    values: dict[str, Any] = {
        "attempts": attempts + 1,
        "last_status_code": status_code,
        "last_error": error,
    }
    if error is None:
        values |= {"status": "delivered", "delivered_at": now}
    else:
        backoff = min(300.0, 2.0 ** (attempts + 1))
        retry_at = now + timedelta(seconds=backoff)
        if retry_at > created_at + timedelta(seconds=policy.retry_for_seconds):
            values["status"] = "failed"
        values["next_attempt_at"] = retry_at
        logger.warning(
            "webhook delivery %s failed (attempt %d): %s", delivery_id, attempts + 1, error
        )
    with transaction(factory) as session:
        session.execute(
            update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(**values)
        )
