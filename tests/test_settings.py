"""README: every setting is a TRAINSVC_ variable or a line in `.env` (the variable wins)."""

import json
from pathlib import Path

import pytest

from app.cli import main
from app.core.config import InvalidSettings, Settings, get_settings

# How `trainsvc` begins its one line when settings cannot be read.
REFUSED = "invalid settings (TRAINSVC_ variables, or lines of .env):\n"


def _exit_of(command: str) -> object:
    """What `trainsvc COMMAND` exits with, the settings read afresh from the environment."""
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit) as exited:
            main([command])
    finally:
        get_settings.cache_clear()
    return exited.value.code


def _settings_error() -> str:
    """Why the settings, read afresh from the environment, are refused."""
    get_settings.cache_clear()
    try:
        with pytest.raises(InvalidSettings) as refused:
            get_settings()
    finally:
        get_settings.cache_clear()
    return str(refused.value)


def test_settings_are_read_from_dot_env_in_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("TRAINSVC_MAX_EPOCHS", "TRAINSVC_DATABASE_URL", "TRAINSVC_WORKER_CONCURRENCY"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".env").write_text(
        "TRAINSVC_MAX_EPOCHS=7\n"
        "TRAINSVC_DATABASE_URL=sqlite:///./from-dotenv.db\n"
        "TRAINSVC_WORKER_CONCURRENCY=3\n"
    )
    settings = Settings()
    assert settings.max_epochs == 7
    assert settings.database_url == "sqlite:///./from-dotenv.db"
    assert settings.worker_concurrency == 3

    monkeypatch.setenv("TRAINSVC_MAX_EPOCHS", "9")
    assert Settings().max_epochs == 9


def test_a_setting_the_service_cannot_use_is_named_with_why_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRAINSVC_MAX_PACK", "eight")
    (tmp_path / ".env").write_text("TRAINSVC_LOG_FORMAT=xml\n")
    assert _exit_of("migrate") == (
        REFUSED + "  TRAINSVC_MAX_PACK: Input should be a valid integer, "
        "unable to parse string as an integer\n"
        "  TRAINSVC_LOG_FORMAT: Input should be 'auto', 'json' or 'console'"
    )  # values are not echoed: a database URL or a key may hold a secret
    assert list(tmp_path.iterdir()) == [tmp_path / ".env"]  # no database was made


def test_a_cors_origin_that_no_browser_sends_is_refused_saying_the_form(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for origin in ("https://dash.example.com", "http://127.0.0.1:3000", "http://[::1]:8080", "*"):
        monkeypatch.setenv("TRAINSVC_CORS_ORIGINS", json.dumps([origin]))
        assert Settings().cors_origins == [origin]
    # A browser's Origin has no path, not even "/": a listed URL with one would never match.
    for origin in ("https://dash.example.com/", "dash.example.com", "ftp://x", "https://x:y"):
        monkeypatch.setenv("TRAINSVC_CORS_ORIGINS", json.dumps([origin]))
        assert _settings_error().endswith(
            f"  TRAINSVC_CORS_ORIGINS: {origin!r} is not an origin: give scheme://host[:port], "
            "as https://dash.example.com, with no path or trailing slash"
        )


@pytest.mark.parametrize(
    "url", ["trainsvc.db", "sqlite:/trainsvc.db", "postgres://u@db/trainsvc", "mysql://u@db/x"]
)
def test_a_database_url_the_service_cannot_use_is_named(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: SQLAlchemy's ArgumentError, NoSuchModuleError or ModuleNotFoundError traceback
    from the first command that connected (`postgres://` is Heroku's spelling, no dialect)."""
    monkeypatch.setenv("TRAINSVC_DATABASE_URL", url)
    assert _exit_of("migrate") == (
        REFUSED + "  TRAINSVC_DATABASE_URL: not a database URL this service can use: give "
        "sqlite:///path/to/trainsvc.db or postgresql+psycopg://user:password@host:5432/name"
    )  # the URL itself is not echoed: it may hold a password


@pytest.mark.parametrize(
    "url", ["foo://x", "redis:/host", "amqp://u@mq//", "sqla+postgresql://u@db/x"]
)
def test_a_broker_url_the_service_cannot_use_is_named(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: `serve` started on it, its broker down for ever, and `worker` ended in kombu's
    KeyError traceback (No such transport)."""
    monkeypatch.setenv("TRAINSVC_BROKER_URL", url)
    assert _exit_of("worker") == (
        REFUSED + "  TRAINSVC_BROKER_URL: not a broker URL this service can use: give "
        "redis://host:6379/0 or sqla+sqlite:///path/to/trainsvc-broker.db"
    )


def test_worker_concurrency_has_the_command_lines_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: --concurrency stopped at 1024, TRAINSVC_WORKER_CONCURRENCY at nothing, and a
    worker started with 100000 would begin forking that many training processes."""
    monkeypatch.setenv("TRAINSVC_WORKER_CONCURRENCY", "100000")
    assert _settings_error().endswith(
        "  TRAINSVC_WORKER_CONCURRENCY: Input should be less than or equal to 1024"
    )


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_a_number_that_is_not_finite_is_refused(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: TRAINSVC_LEASE_SECONDS=inf passed gt=0, and a lease that never runs out means a
    lost worker's job is never taken back."""
    monkeypatch.setenv("TRAINSVC_LEASE_SECONDS", value)
    assert _settings_error().endswith("  TRAINSVC_LEASE_SECONDS: Input should be a finite number")


@pytest.mark.parametrize("name", ["TRAINSVC_CORS_ORIGINS", "TRAINSVC_WEBHOOK_ALLOWED_HOSTS"])
def test_a_list_that_is_not_json_is_named_with_why(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: pydantic-settings' SettingsError, with a traceback, naming the field and not why."""
    monkeypatch.setenv(name, "https://dash.example.com")
    assert _exit_of("migrate") == (
        REFUSED
        + f'  {name}: not JSON (Expecting value at column 1): give a JSON list, as ["a", "b"]'
    )
    monkeypatch.setenv(name, '["dash.example.com"]' if "HOSTS" in name else '["https://x.org"]')
    assert len(Settings().model_dump()[name.removeprefix("TRAINSVC_").lower()]) == 1


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["up", "--port", "99999"], "argument --port: '99999' is not a TCP port (0 to 65535)"),
        (["serve", "--port", "http"], "argument --port: 'http' is not a TCP port (0 to 65535)"),
        (
            ["worker", "--concurrency", "0"],
            "argument --concurrency: '0' is not a number of processes (1 to 1024)",
        ),
    ],
)
def test_command_line_numbers_out_of_range_are_refused_by_name(
    argv: list[str], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: a port over 65535 ended `up` in a traceback from deep in asyncio, after the
    worker had started; --concurrency 0 quietly meant the default."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert reason in capsys.readouterr().err


def test_every_setting_is_documented(repo_root: Path) -> None:
    """README says every setting is documented; three were not (found by a new user)."""
    text = (repo_root / "README.md").read_text() + "".join(
        path.read_text() for path in sorted((repo_root / "docs").glob("*.md"))
    )
    missing = [name for name in Settings.model_fields if f"TRAINSVC_{name.upper()}" not in text]
    assert missing == []
