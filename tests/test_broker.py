"""The broker's settings: the embedded SQL broker is polled at the configured interval."""

from pathlib import Path

from app.core.broker import create_celery_app
from app.core.config import Settings


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
