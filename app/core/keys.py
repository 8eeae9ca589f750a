"""API keys: made, listed and revoked by `trainsvc keys`, and checked on every API request.

A key is `tsk_` and 32 random bytes (URL-safe base64). The database keeps its first 12
characters (the prefix: a public handle, used to find the row) and the SHA-256 of the whole
key, never the key. 256 random bits need no slow password hash: SHA-256 cannot be reversed
and no dictionary holds such a key. Hashes are compared in constant time.
"""

import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.core.db import transaction
from app.core.errors import InvalidInput, NotFound, RevokedKey, Unauthorized, UnknownKey
from app.core.models import ApiKey, utcnow
from app.core.models.keys import DESCRIPTION_LENGTH, TENANT_NAME_LENGTH
from app.core.tenancy import Caller

logger = logging.getLogger(__name__)

KEY_PREFIX = "tsk_"
PREFIX_LENGTH = 12  # "tsk_" and 8 random characters: 48 bits, unique per key, not a secret
KEY_PATTERN = re.compile(r"tsk_[A-Za-z0-9_-]{43}")  # token_urlsafe(32) is 43 characters
TENANT_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{TENANT_NAME_LENGTH - 1}}}")
# A key's last_used_at is written at most this often: a timestamp, not a write per request.
LAST_USED_RESOLUTION = timedelta(minutes=1)


class KeyNotFound(NotFound):
    code = "key_not_found"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(
    session: Session, tenant: str, admin: bool = False, description: str | None = None
) -> tuple[ApiKey, str]:
    """A new key for `tenant`: its row, and the key itself, which is never stored or shown again."""
    if not TENANT_PATTERN.fullmatch(tenant):
        raise InvalidInput(
            "tenant", f"1 to {TENANT_NAME_LENGTH} letters, digits, '.', '_' or '-', not {tenant!r}"
        )
    if description is not None and (
        len(description) > DESCRIPTION_LENGTH or not description.isprintable()
    ):
        # Longer was PostgreSQL's DataError (a traceback from `keys create`); a control
        # character or line break was printed as is by `keys list`, to the operator's terminal.
        raise InvalidInput(
            "description",
            f"at most {DESCRIPTION_LENGTH} printable characters, no line breaks or control "
            "characters",
        )
    while True:
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        prefix = key[:PREFIX_LENGTH]
        if session.scalars(select(ApiKey.id).where(ApiKey.prefix == prefix)).first() is None:
            break
    row = ApiKey(
        tenant=tenant,
        admin=admin,
        description=description,
        prefix=prefix,
        key_sha256=hash_key(key),
    )
    session.add(row)
    session.flush()
    return row, key


def list_keys(session: Session) -> Sequence[ApiKey]:
    return session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)).all()


def revoke_key(session: Session, key_id: uuid.UUID) -> ApiKey:
    """Revoke a key (again is harmless): every API process refuses it within its cache time."""
    row = session.get(ApiKey, key_id)
    if row is None:
        raise KeyNotFound(f"no key {key_id}")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return row


class KeyVerifier:
    """Checks presented keys, remembering each answer for `cache_seconds`.

    A status poll then costs a dictionary lookup, not a query; a revocation is seen by every
    API process once its cached answer expires. Answers are kept by the key's hash, never the
    key, and unknown keys are remembered too, so guessing cannot hammer the database.

    The lookup only reads (on SQLite it never waits for a worker's write); a key's
    last_used_at is written by a background thread, so no request waits on that write.
    """

    MAX_ENTRIES = 10_000

    def __init__(
        self,
        cache_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        background_writes: bool = True,
    ) -> None:
        self.cache_seconds = cache_seconds
        self.clock = clock
        # False writes last_used_at in the caller's thread (a test whose sessions share one
        # connection cannot hand it to another thread).
        self.background_writes = background_writes
        self._answers: dict[str, tuple[float, Caller | Unauthorized]] = {}
        self._lock = threading.Lock()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="key-last-used")
        self._writes: list[Future[None]] = []

    def verify(self, session_factory: sessionmaker[Session], key: str) -> Caller:
        """The caller a well-formed key stands for; UnknownKey or RevokedKey if none."""
        cached = self.cached(key)
        if cached is not None:
            return cached
        digest = hash_key(key)
        now = self.clock()
        with transaction(session_factory, write=False) as session:
            answer, stale = _look_up(session, key, digest)
        if stale is not None:
            self._touch(session_factory, stale)
        with self._lock:
            if len(self._answers) >= self.MAX_ENTRIES:
                self._answers.clear()
            self._answers[digest] = (now + self.cache_seconds, answer)
        return _caller_or_raise(answer)

    def cached(self, key: str) -> Caller | None:
        """The remembered answer for `key` (raised if it was a refusal); None if none is fresh.

        No I/O: the API answers a cached key on its event loop, without a worker thread.
        """
        digest = hash_key(key)
        with self._lock:
            cached = self._answers.get(digest)
        if cached is None or cached[0] <= self.clock():
            return None
        return _caller_or_raise(cached[1])

    def _touch(self, session_factory: sessionmaker[Session], key_id: uuid.UUID) -> None:
        def write() -> None:
            try:
                with transaction(session_factory) as session:
                    session.execute(
                        update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=utcnow())
                    )
            except Exception:  # a timestamp: never worth failing or slowing a request for
                logger.warning("could not record the use of key %s", key_id, exc_info=True)

        if not self.background_writes:
            write()
            return
        with self._lock:
            self._writes = [f for f in self._writes if not f.done()]
            self._writes.append(self._writer.submit(write))

    def wait_for_writes(self) -> None:
        """Block until every last_used_at write so far has landed (tests, shutdown)."""
        with self._lock:
            pending = list(self._writes)
        for future in pending:
            future.result()


def _caller_or_raise(answer: Caller | Unauthorized) -> Caller:
    if isinstance(answer, Unauthorized):
        # A fresh exception each time: one raised twice would grow its traceback.
        raise type(answer)(answer.detail)
    return answer


def _look_up(
    session: Session, key: str, digest: str
) -> tuple[Caller | Unauthorized, uuid.UUID | None]:
    """The key's answer, and its id when its last_used_at is due for a write."""
    row = session.scalars(select(ApiKey).where(ApiKey.prefix == key[:PREFIX_LENGTH])).first()
    if row is None or not hmac.compare_digest(row.key_sha256, digest):
        return UnknownKey("the API key is not known to this service"), None
    if row.revoked_at is not None:
        return RevokedKey(f"the API key {row.prefix}... was revoked"), None
    due = row.last_used_at is None or utcnow() - row.last_used_at >= LAST_USED_RESOLUTION
    return Caller.from_key(row), row.id if due else None
