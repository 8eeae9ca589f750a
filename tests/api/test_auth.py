"""API keys: their format and storage, the 401s, the cache, revocation, the CLI, auth off."""

import asyncio
import hashlib
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import Request

from app.api.auth import KeyRateLimiter, install_auth, still_authorized
from app.api.main import create_app
from app.core.config import Settings, check_exposure
from app.core.db import create_db_engine, create_session_factory, transaction
from app.core.errors import InvalidInput, RequestRateExceeded, RevokedKey, UnknownKey
from app.core.keys import KeyVerifier, create_key, revoke_key
from app.core.migrate import upgrade
from app.core.models import ApiKey
from app.core.tenancy import Caller
from tests.conftest import use_test_sessions
from tests.support.documented import documented_client
from tests.support.processes import free_port

KeyHeaders = Callable[..., dict[str, str]]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_key_is_256_random_bits_and_only_its_hash_is_stored(session: Session) -> None:
    row, key = create_key(session, "acme", description="ci")
    assert re.fullmatch(r"tsk_[A-Za-z0-9_-]{43}", key)
    assert row.key_sha256 == hashlib.sha256(key.encode()).hexdigest()
    assert row.prefix == key[:12]
    stored = session.execute(sa.select(ApiKey.__table__).where(ApiKey.id == row.id)).one()
    assert all(key not in str(value) for value in stored)
    _, other = create_key(session, "acme")
    assert other != key


def test_a_tenant_name_is_checked(session: Session) -> None:
    with pytest.raises(Exception, match="letters, digits"):
        create_key(session, "no spaces please")


@pytest.mark.parametrize(
    "description", ["x" * 201, "two\nlines", "\x1b[2J\x1b[Hcleared", "nul\x00", "\ud800"]
)
def test_a_description_is_checked(session: Session, description: str) -> None:
    """Too long was PostgreSQL's DataError, a traceback from `keys create` (SQLite kept it);
    escape sequences and line breaks were printed as they were by `keys list`."""
    with pytest.raises(InvalidInput, match="printable characters") as refused:
        create_key(session, "acme", description=description)
    assert refused.value.field == "description"
    row, _ = create_key(session, "acme", description="CI — Zoë's runner " + "x" * 182)
    assert row.description is not None


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_key"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "malformed_key"),
        ({"Authorization": "Bearer "}, "malformed_key"),
        ({"Authorization": "Bearer not-a-key"}, "malformed_key"),
        ({"Authorization": "Bearer tsk_" + "A" * 43}, "unknown_key"),
    ],
)
def test_no_usable_key_is_401_saying_which(
    client: TestClient, headers: dict[str, str], code: str
) -> None:
    del client.headers["Authorization"]
    response = client.get("/v1/jobs", headers=headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert response.json()["error"] == code
    assert isinstance(response.json()["detail"], str)


def test_a_revoked_key_is_401_revoked(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    app = create_app(settings.model_copy(update={"key_cache_seconds": 0}))
    with documented_client(app) as client:
        use_test_sessions(app, session_factory)
        with session_factory() as session:
            row, key = create_key(session, "acme")
            session.commit()
        headers = {"Authorization": f"Bearer {key}"}
        assert client.get("/v1/jobs", headers=headers).status_code == 200
        with session_factory() as session:
            revoke_key(session, row.id)
            session.commit()
        response = client.get("/v1/jobs", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"] == "revoked_key"
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_health_and_readiness_need_no_key(client: TestClient) -> None:
    del client.headers["Authorization"]
    assert client.get("/v1/health").status_code == 200
    assert client.get("/v1/ready").status_code == 200


def test_answers_are_cached_briefly_and_revocation_lands_when_they_expire(
    session_factory: sessionmaker[Session],
) -> None:
    clock = FakeClock()
    verifier = KeyVerifier(cache_seconds=1.0, clock=clock, background_writes=False)
    with session_factory() as session:
        row, key = create_key(session, "acme", admin=True)
        session.commit()
    assert verifier.verify(session_factory, key) == Caller("acme", True, row.id)

    with session_factory() as session:
        revoke_key(session, row.id)
        session.commit()
    clock.now += 0.9  # still the cached answer: no query for a status poll
    assert verifier.verify(session_factory, key).tenant == "acme"
    clock.now += 0.2  # past the cache time: the revocation is seen
    with pytest.raises(RevokedKey):
        verifier.verify(session_factory, key)
    with pytest.raises(UnknownKey):
        verifier.verify(session_factory, "tsk_" + "B" * 43)


def test_last_used_is_written_once_a_minute_not_per_request(
    session_factory: sessionmaker[Session],
) -> None:
    # Every call goes to the database; the test's one connection stays in this thread.
    verifier = KeyVerifier(cache_seconds=0, background_writes=False)
    with session_factory() as session:
        row, key = create_key(session, "acme")
        session.commit()
    verifier.verify(session_factory, key)
    verifier.wait_for_writes()  # written beside the request, never in its way
    with session_factory() as session:
        first = session.get(ApiKey, row.id)
        assert first is not None
        assert first.last_used_at is not None
        first_used = first.last_used_at
    verifier.verify(session_factory, key)
    verifier.wait_for_writes()
    with session_factory() as session:
        again = session.get(ApiKey, row.id)
        assert again is not None
        assert again.last_used_at == first_used


def test_a_key_over_its_request_rate_is_429_naming_the_rate(
    settings: Settings, session_factory: sessionmaker[Session], key_headers: KeyHeaders
) -> None:
    app = create_app(
        settings.model_copy(update={"key_requests_per_second": 0.5, "key_request_burst": 2})
    )
    with documented_client(app) as client:
        use_test_sessions(app, session_factory)
        limited, other = key_headers("acme"), key_headers("acme")
        answers = [client.get("/v1/jobs", headers=limited) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 429]
        assert answers[2].json()["error"] == "request_rate_exceeded"
        assert "0.5 requests per second" in answers[2].json()["detail"]
        assert int(answers[2].headers["Retry-After"]) >= 1
        assert client.get("/v1/jobs", headers=other).status_code == 200  # per key


def test_the_token_bucket_refills_at_its_rate() -> None:
    clock = FakeClock()
    limiter = KeyRateLimiter(rate=2.0, burst=2, clock=clock)
    key = uuid.uuid4()
    limiter.take(key)
    limiter.take(key)
    with pytest.raises(RequestRateExceeded) as refused:
        limiter.take(key)
    assert refused.value.retry_after_seconds == 1
    clock.now += 0.5  # one token back
    limiter.take(key)
    with pytest.raises(RequestRateExceeded):
        limiter.take(key)


def test_with_auth_off_every_request_is_the_default_tenants_admin(
    settings: Settings, session_factory: sessionmaker[Session]
) -> None:
    app = create_app(settings.model_copy(update={"auth": "off"}))
    with documented_client(app) as client:
        use_test_sessions(app, session_factory)
        app.state.dispatcher.session_factory = session_factory
        created = client.post("/v1/jobs", json={"dataset": {"name": "iris"}, "epochs": 1})
        assert created.status_code == 201, created.text
        assert created.json()["tenant"] == "default"
        assert client.get("/v1/jobs").status_code == 200


def test_metrics_need_an_admin_key_only_when_the_setting_says_so(
    settings: Settings, session_factory: sessionmaker[Session], key_headers: KeyHeaders
) -> None:
    """Its figures count every tenant's jobs together: any tenant's key read them before."""
    for required in (False, True):
        app = create_app(settings.model_copy(update={"metrics_require_key": required}))
        with documented_client(app) as client:
            use_test_sessions(app, session_factory)
            anonymous = client.get("/metrics")
            tenant = client.get("/metrics", headers=key_headers("acme"))
            admin = client.get("/metrics", headers=key_headers("ops", admin=True))
        assert admin.status_code == 200
        assert "trainsvc_jobs" in admin.text
        if required:
            assert anonymous.status_code == 401
            assert tenant.status_code == 403
            assert tenant.json()["error"] == "admin_key_required"
            assert "--admin" in tenant.json()["detail"]
        else:
            assert anonymous.status_code == tenant.status_code == 200


@pytest.mark.parametrize(
    ("auth", "host", "allow", "refused"),
    [
        ("on", "0.0.0.0", False, False),
        ("off", "127.0.0.1", False, False),
        ("off", "::1", False, False),
        ("off", "localhost", False, False),
        ("off", "0.0.0.0", False, True),
        ("off", "10.1.2.3", False, True),
        ("off", "0.0.0.0", True, False),
    ],
)
def test_auth_off_is_refused_off_loopback_unless_allowed(
    auth: str, host: str, allow: bool, refused: bool
) -> None:
    settings = Settings(auth=auth, allow_unauthenticated_network=allow)  # type: ignore[arg-type]
    refusal = check_exposure(settings, host)
    assert (refusal is not None) == refused
    if refusal:
        assert "TRAINSVC_ALLOW_UNAUTHENTICATED_NETWORK" in refusal


def _cli(repo_root: Path, url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSVC_")}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env={**inherited, "TRAINSVC_DATABASE_URL": url, **env},
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_serve_refuses_auth_off_on_a_network_address(tmp_path: Path, repo_root: Path) -> None:
    url = f"sqlite:///{tmp_path}/refuse.db"
    result = _cli(repo_root, url, "serve", "--host", "0.0.0.0", TRAINSVC_AUTH="off")
    assert result.returncode != 0
    assert "refusing to serve without API keys on 0.0.0.0" in result.stderr


def test_up_runs_without_keys_so_only_on_loopback(tmp_path: Path, repo_root: Path) -> None:
    # No TRAINSVC_AUTH: `up` turns auth off itself, so a network address is refused too.
    result = _cli(repo_root, f"sqlite:///{tmp_path}/up.db", "up", "--host", "0.0.0.0")
    assert result.returncode != 0
    assert "refusing to serve without API keys on 0.0.0.0" in result.stderr
    assert not (tmp_path / "up.db").exists()  # refused before anything started


def test_keys_commands_create_list_and_revoke(tmp_path: Path, repo_root: Path) -> None:
    url = f"sqlite:///{tmp_path}/keys.db"
    upgrade(url)
    created = _cli(repo_root, url, "keys", "create", "--tenant", "acme", "--description", "ci")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]  # alone on the last line
    assert re.fullmatch(r"tsk_[A-Za-z0-9_-]{43}", key)

    listed = _cli(repo_root, url, "keys", "list")
    assert listed.returncode == 0, listed.stderr
    assert key[:12] in listed.stdout
    assert "acme" in listed.stdout
    assert key not in listed.stdout

    settings = Settings(
        database_url=url, broker_url=f"sqla+sqlite:///{tmp_path}/broker.db", key_cache_seconds=0
    )
    with documented_client(create_app(settings)) as client:
        headers = {"Authorization": f"Bearer {key}"}
        assert client.get("/v1/jobs", headers=headers).status_code == 200
        engine = create_db_engine(url)
        with transaction(create_session_factory(engine)) as session:
            key_id = session.scalars(sa.select(ApiKey.id)).one()
        engine.dispose()
        revoked = _cli(repo_root, url, "keys", "revoke", str(key_id))
        assert revoked.returncode == 0, revoked.stderr
        assert client.get("/v1/jobs", headers=headers).json()["error"] == "revoked_key"
    unknown = _cli(repo_root, url, "keys", "revoke", str(uuid.uuid4()))
    assert unknown.returncode != 0
    assert "no key" in unknown.stderr
    bad = _cli(repo_root, url, "keys", "create", "--tenant", "a b")
    assert bad.returncode != 0
    assert bad.stderr.strip() == (
        "cannot create a key: tenant: 1 to 100 letters, digits, '.', '_' or '-', not 'a b'"
    )


def test_pg_dump_of_a_database_with_keys_in_use_holds_no_key(
    fresh_postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    pg_dump = subprocess.run(["which", "pg_dump"], capture_output=True, text=True).stdout.strip()
    if not pg_dump:
        pytest.skip("pg_dump is not installed")
    settings = Settings(database_url=fresh_postgres_url, broker_url=redis_url)
    engine = create_db_engine(fresh_postgres_url)
    with transaction(create_session_factory(engine)) as session:
        keys = [create_key(session, tenant)[1] for tenant in ("acme", "globex")]
    engine.dispose()
    with documented_client(create_app(settings)) as client:
        for key in keys:  # in use: last_used_at written, a job stored under the key's tenant
            headers = {"Authorization": f"Bearer {key}"}
            submitted = client.post(
                "/v1/jobs", json={"dataset": {"name": "iris"}, "epochs": 1}, headers=headers
            )
            assert submitted.status_code == 201, submitted.text
    url = sa.make_url(fresh_postgres_url)
    dump = subprocess.run(
        [
            pg_dump,
            "--host",
            url.host or "127.0.0.1",
            "--port",
            str(url.port or 5432),
            "--username",
            url.username or "postgres",
            "--dbname",
            url.database or "",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PGPASSWORD": url.password or ""},
    )
    assert dump.returncode == 0, dump.stderr
    for key in keys:
        assert key[:12] in dump.stdout  # the dump does hold the keys' rows...
        assert hashlib.sha256(key.encode()).hexdigest() in dump.stdout
        assert key not in dump.stdout  # ...but not the keys
        assert key[12:] not in dump.stdout


def test_a_streams_key_check_rides_out_a_database_outage(settings: Settings) -> None:
    """An open stream asks every second whether its key still holds. With the key's cached
    answer stale and the database away, that check raised in the middle of the stream (a
    logged 'Exception in ASGI application'); it now says "ask again" and the stream goes on.
    The outage is real: a PostgreSQL URL on a port where nothing listens."""
    app = create_app(settings)
    install_auth(app.state, settings)
    app.state.settings = settings
    away = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test?connect_timeout=2"
    app.state.session_factory = create_session_factory(create_db_engine(away))
    headers = [(b"authorization", b"Bearer tsk_" + b"a" * 43)]
    request = Request({"type": "http", "app": app, "headers": headers})
    assert asyncio.run(still_authorized(request)) is True
