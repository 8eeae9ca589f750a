"""README: every setting is a TRAINSVC_ variable or a line in `.env` (the variable wins)."""

from pathlib import Path

import pytest

from app.core.config import Settings


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
