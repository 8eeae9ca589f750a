"""Webhooks: when a job with a callback ends, POST it to the callback's URL, signed.

A delivery row is written in the transaction that ends the job, so it survives any crash after
that; the worker's sweeper sends due deliveries, retrying with backoff for a bounded time. A
receiver checks `X-Trainsvc-Signature: t=<unix time>,v1=<hex HMAC-SHA256(secret, "t.body")>`,
rejects a stale `t` (replays), and may drop a repeated `X-Trainsvc-Delivery` id (delivery is at
least once: a sender killed between the POST and recording it sends again).

A webhook is a request the service makes on a tenant's behalf from inside its network. Unless
the operator lists the hosts it may reach, it reaches public addresses only: a callback to a
private, loopback or link-local address (the database, a cloud's metadata service) is refused
at submit when the URL names the address, and at connect time when a name resolves to one,
which also covers a name that resolved elsewhere at submit. Otherwise any tenant could probe
the internal network through its deliveries' errors.
"""

import hashlib
import hmac
import ipaddress
import json
import logging
import re
import socket
import ssl
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx
from sqlalchemy import func, insert, select, update
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
    allowed_hosts: tuple[str, ...]  # empty: any host with public addresses only
    retry_for_seconds: float  # give a delivery up this long after the job ended
    timeout_seconds: float
    private_networks: bool = False  # without a host list, may a callback reach private ones

    @property
    def public_only(self) -> bool:
        # An operator's list is trusted wherever its names resolve (an internal receiver is
        # what one lists); without one, only what anyone on the internet could reach.
        return not self.allowed_hosts and not self.private_networks


def policy_from(settings: Settings) -> WebhookPolicy:
    return WebhookPolicy(
        tuple(settings.webhook_allowed_hosts),
        settings.webhook_retry_for_seconds,
        settings.webhook_timeout_seconds,
        settings.webhook_allow_private_networks,
    )


_NOT_PUBLIC = (
    "is not a public address; a webhook may reach a private network only where the operator "
    "lists its host (TRAINSVC_WEBHOOK_ALLOWED_HOSTS) or allows private networks "
    "(TRAINSVC_WEBHOOK_ALLOW_PRIVATE_NETWORKS)"
)


# What a host may hold: letters (any script: httpx encodes IDNA), digits, "-", "_" and dots;
# or an IPv6 literal (urlsplit strips its brackets). Not spaces, "%" escapes or other syntax.
_HOST = re.compile(r"[^\W]([\w.-]*[^\W])?|[0-9a-f:.]+", re.IGNORECASE)


def check_url(url: str, policy: WebhookPolicy, field: str = "callback.url") -> None:
    """Only http(s) URLs with a well-formed host and port; only to the operator's allowed
    hosts when a list is set; without one, not to an address (or localhost) that is not
    public, unless private networks are allowed. A name is resolved when the delivery
    connects (PublicAddressesOnly), not here."""
    try:
        parts = urlsplit(url)  # raises on a bracketed IPv6 host left open ("http://[::1/x")
    except ValueError as exc:
        raise InvalidInput(field, f"is not a well-formed URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(field, "must be an http:// or https:// URL with a host")
    bad_port = InvalidInput(field, "the port must be a number from 1 to 65535")
    try:
        port = parts.port  # urlsplit checks the port only when it is read
    except ValueError as exc:
        raise bad_port from exc
    if port == 0:  # nothing can be reached on port 0: every delivery would fail
        raise bad_port
    if parts.username is not None or parts.password is not None:
        # The URL is shown with the job, its study and its deliveries; the secret is not.
        raise InvalidInput(
            field, "must not hold a user name or password (they would be shown with the job)"
        )
    host = parts.hostname.lower().removesuffix(".")  # "localhost." is localhost
    if not _HOST.fullmatch(host):
        raise InvalidInput(field, f"{host!r} is not a host name or address")
    try:
        httpx.URL(url)  # what a delivery sends to: a name IDNA cannot encode fails every one
    except httpx.InvalidURL as exc:
        raise InvalidInput(field, f"cannot be sent to: {exc}") from exc
    allowed_hosts = policy.allowed_hosts
    if allowed_hosts and not any(_host_matches(host, allowed) for allowed in allowed_hosts):
        raise InvalidInput(field, f"host {host!r} is not allowed (TRAINSVC_WEBHOOK_ALLOWED_HOSTS)")
    if policy.public_only and (
        host == "localhost" or host.endswith(".localhost") or _is_private_address(host)
    ):
        raise InvalidInput(field, f"{host} {_NOT_PUBLIC}")


def _is_private_address(host: str) -> bool:
    """Whether `host` is an IP address (not a name) that is not globally reachable, in any
    form the resolver accepts: inet_aton also reads 127.1, 2130706433 and 0x7f000001."""
    try:
        return not ipaddress.ip_address(host).is_global
    except ValueError:
        pass
    try:
        return not ipaddress.ip_address(socket.inet_aton(host)).is_global
    except (OSError, ValueError):
        return False  # a name


class _Deadline:
    """The time left to a delivery, as the timeout of its next socket operation."""

    def __init__(self, seconds: float) -> None:
        self._at = time.monotonic() + seconds

    def left(self, timeout: float | None, error: type[httpcore.TimeoutException]) -> float:
        left = self._at - time.monotonic()
        if left <= 0:
            raise error("the delivery took longer than TRAINSVC_WEBHOOK_TIMEOUT_SECONDS")
        return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream, deadline: _Deadline) -> None:
        self._stream = stream
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            return self._stream.read(max_bytes, self._deadline.left(timeout, httpcore.ReadTimeout))
        except httpcore.ReadTimeout:
            self._deadline.left(None, httpcore.ReadTimeout)  # the deadline's, if it was
            raise

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        try:
            self._stream.write(buffer, self._deadline.left(timeout, httpcore.WriteTimeout))
        except httpcore.WriteTimeout:
            self._deadline.left(None, httpcore.WriteTimeout)
            raise

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        timeout = self._deadline.left(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(
            self._stream.start_tls(ssl_context, server_hostname, timeout), self._deadline
        )

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class WithinDeadline(httpcore.SyncBackend):
    """Connections whose every read and write ends by one deadline. httpx's timeout bounds
    each socket operation alone, so a receiver that answers a byte a second would hold the
    sweep, and every other tenant's deliveries behind it, for as long as it liked."""

    def __init__(self, deadline: _Deadline) -> None:
        self._deadline = deadline

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        timeout = self._deadline.left(timeout, httpcore.ConnectTimeout)
        stream = super().connect_tcp(host, port, timeout, local_address, socket_options)
        return _DeadlineStream(stream, self._deadline)


class PublicAddressesOnly(WithinDeadline):
    """Connects only where every address the host resolves to is public, and to the address it
    checked: so a name that resolves, or is re-pointed after submit, to a private address is
    refused as a literal one is. TLS still verifies the URL's own host name (httpcore passes it
    to start_tls), and the Host header is the URL's."""

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        addresses = list(dict.fromkeys(str(sockaddr[0]) for *_, sockaddr in found))
        if any(_is_private_address(address.partition("%")[0]) for address in addresses):
            raise httpcore.ConnectError(f"{host} resolves to an address that {_NOT_PUBLIC}")
        # Each checked address in turn, as a connection to the name would try them (an IPv6
        # address first on a network without IPv6 must not fail the delivery).
        failure: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        for address in addresses:
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None  # getaddrinfo answers at least one address or raises
        raise failure


def _client(policy: WebhookPolicy) -> httpx.Client:
    """A client for one delivery: its connections end by the policy's timeout, all told."""
    deadline = _Deadline(policy.timeout_seconds)
    transport = httpx.HTTPTransport()
    # httpx takes no network backend; its pool (httpcore, pinned with it) does.
    backend = PublicAddressesOnly if policy.public_only else WithinDeadline
    transport._pool._network_backend = backend(deadline)
    # No redirects: a receiver could otherwise send the POST on to an address refused here.
    return httpx.Client(timeout=policy.timeout_seconds, follow_redirects=False, transport=transport)


def _host_matches(host: str, allowed: str) -> bool:
    allowed = allowed.lower().removesuffix(".")
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
    for delivery_id in due:
        with _client(policy) as client:
            _send_one(factory, client, policy, delivery_id)
    return len(due)


def _lease_due(factory: sessionmaker[Session], limit: int) -> list[uuid.UUID]:
    now = utcnow()
    # Tenants take turns: each tenant's longest-due delivery first, then each one's second...
    # Oldest first alone let one tenant's deliveries to a receiver that never answers (each
    # up to the timeout) fill every sweep while every other tenant's waited behind them.
    turn = (
        func.row_number()
        .over(partition_by=Job.tenant, order_by=WebhookDelivery.next_attempt_at)
        .label("turn")
    )
    due = (
        select(WebhookDelivery.id, WebhookDelivery.next_attempt_at, turn)
        .join(Job, Job.id == WebhookDelivery.job_id)
        .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
        .subquery()
    )
    with transaction(factory) as session:
        ids = list(
            session.scalars(
                select(due.c.id).order_by(due.c.turn, due.c.next_attempt_at).limit(limit)
            )
        )
        if not ids:
            return []
        # Conditional, and only what it changed counts: two sweepers may select the same rows
        # (no FOR UPDATE: PostgreSQL allows none with a window function; SQLite has none), but
        # only one moves each row's lease forward.
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
        check_url(url, policy)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(secret, int(time.time()), body),
            DELIVERY_HEADER: str(delivery_id),
        }
        # Only the status counts, so the body is never read: a receiver's endless or
        # gigabyte answer (post() reads it whole) would otherwise fill the worker's memory.
        with client.stream("POST", url, content=body, headers=headers) as response:
            status_code = response.status_code
        if not 200 <= status_code < 300:
            error = f"the receiver answered {status_code}"
    except InvalidInput as exc:
        error = exc.message
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # InvalidURL is not an HTTPError
        error = f"{type(exc).__name__}: {exc}"[:1000]
    except Exception as exc:
        # Whatever else one delivery meets is that delivery's failed attempt, recorded and
        # retried on its schedule: raised, it left the delivery pending for ever and stopped
        # the sweep before the deliveries leased after it.
        logger.exception("webhook delivery %s raised", delivery_id)
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
