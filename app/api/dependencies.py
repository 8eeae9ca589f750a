"""Dependencies every router shares: settings, the request's session, the dispatcher."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.core.db import READ_ONLY, Reader
from app.core.errors import InvalidInput
from app.core.outbox import Dispatcher


async def get_settings_dep(request: Request) -> Settings:
    # async: no I/O, so no hop to a worker thread (FastAPI runs a plain def in one).
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request: committed if the route returns, rolled back if it raises.

    Used with scope="function" (SessionDep): the commit then runs when the route returns and
    before the response is sent, so a failed commit is an error response, never a 2xx, and a
    client's next request sees its write. (A yield dependency's default scope exits only after
    the response has gone out.)

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


async def get_session_factory(request: Request) -> sessionmaker[Session]:
    """For work that outlives the route (a streamed download), or that a route hands to a worker
    thread whole (the status reads): it opens its own sessions. (async: no I/O, no thread.)"""
    factory: sessionmaker[Session] = request.app.state.session_factory
    return factory


async def get_reader(request: Request) -> Reader:
    """What the polled status reads run on, whole, in one call (see app.core.db.Reader).
    (async: no I/O, no thread.)"""
    reader: Reader = request.app.state.reader
    return reader


def get_dispatcher(request: Request) -> Dispatcher:
    dispatcher: Dispatcher = request.app.state.dispatcher
    return dispatcher


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SessionFactoryDep = Annotated[sessionmaker[Session], Depends(get_session_factory)]
ReaderDep = Annotated[Reader, Depends(get_reader)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]


def idempotency_key_from_headers(
    request: Request,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=200,
            description="repeat a create safely: the same key and body return the original",
        ),
    ] = None,
) -> str | None:
    # Starlette hands the first of repeated headers to the parameter; two keys are ambiguous.
    count = len(request.headers.getlist("idempotency-key"))
    if count > 1:
        raise InvalidInput("idempotency-key", f"send one Idempotency-Key header, not {count}")
    return idempotency_key


IdempotencyKeyDep = Annotated[str | None, Depends(idempotency_key_from_headers)]
