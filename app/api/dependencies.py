"""Dependencies every router shares: settings, the request's session, the dispatcher."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import READ_ONLY
from app.core.outbox import Dispatcher


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request: committed if the route returns, rolled back if it raises.

    A GET only reads, so its session takes no write lock (on SQLite it reads beside a writer).
    """
    options = READ_ONLY if request.method in ("GET", "HEAD") else {}
    with request.app.state.session_factory(execution_options=options) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def get_dispatcher(request: Request) -> Dispatcher:
    dispatcher: Dispatcher = request.app.state.dispatcher
    return dispatcher


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
