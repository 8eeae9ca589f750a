"""The broker's settings: the embedded SQL broker is polled at the configured interval, and
readiness waits for the broker as long as a publish does."""

from pathlib import Path
from typing import Any

import pytest
from kombu.connection import Connection
from sqlalchemy.orm import sessionmaker

from app.core.broker import create_celery_app
from app.core.config import Settings
from app.core.outbox import Dispatcher


def test_embedded_broker_polls_at_the_configured_interval(tmp_path: Path) -> None:
    # kombu's SQL transport looked for a message once a second (its default), which capped
    # the embedded default at 60 job starts a minute.
    settings = Settings(broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    assert settings.broker_polling_seconds <= 0.1
    app = create_celery_app(settings)
    with app.connection_for_write() as connection:
        assert connection.transport.polling_interval == settings.broker_polling_seconds
        # And the broker still works: a message goes in and comes out.
        with connection.SimpleQueue("probe") as queue:
            queue.put({"job": "x"})
            message = queue.get(timeout=5)
            message.ack()
            assert message.payload == {"job": "x"}


def test_redis_broker_keeps_its_visibility_timeout(redis_url: str) -> None:
    settings = Settings(broker_url=redis_url)
    app = create_celery_app(settings)
    assert app.conf.broker_transport is None
    options = app.conf.broker_transport_options
    assert options["visibility_timeout"] == settings.max_wall_seconds + 2 * settings.lease_seconds


def test_readiness_waits_for_the_broker_as_long_as_a_publish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # /v1/ready waited a fixed 2 s, whatever TRAINSVC_BROKER_PUBLISH_TIMEOUT_SECONDS said.
    settings = Settings(
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}", broker_publish_timeout_seconds=7.5
    )
    waited: list[float] = []

    def ensure_connection(self: Connection, *args: Any, **kwargs: Any) -> Connection:
        waited.append(kwargs["timeout"])
        return self

    monkeypatch.setattr(Connection, "ensure_connection", ensure_connection)
    dispatcher = Dispatcher(create_celery_app(settings), sessionmaker())
    assert dispatcher.broker_reachable()
    assert waited == [7.5]
