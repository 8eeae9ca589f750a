"""Dependencies every router shares: settings, the request's session, the dispatcher, and the
checks of what a request sends beyond its declared fields."""

import json
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session, sessionmaker
from starlette.datastructures import ImmutableMultiDict

from app.api.errors import is_json
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


async def check_query_parameters(request: Request) -> None:
    """A query parameter the operation does not declare, or one it takes once sent more than
    once, is a 422. FastAPI would ignore the first and keep the last of the second: a client
    paging with ?offset= or asking for ?status=queued&status=failed would get an answer that
    looks like one to its question and is not. (async: no I/O, no thread.)"""
    if not request.scope["query_string"]:
        return
    declared = {
        parameter["name"]: _takes_many(parameter["schema"])
        for parameter in _operation(request).get("parameters", ())
        if parameter["in"] == "query"
    }
    _check_names("query parameter", request.query_params, declared)


async def check_form_fields(request: Request) -> None:
    """The same for a multipart form's fields: a second file, or a field the operation does
    not take ("knd" for "kind"), is a 422, not the last file stored or the field ignored.
    (async: FastAPI has parsed the form already; this reads its parse.)"""
    body = _operation(request)["requestBody"]["content"]["multipart/form-data"]["schema"]
    schema = request.app.openapi()["components"]["schemas"][body["$ref"].rpartition("/")[2]]
    declared = {name: _takes_many(field) for name, field in schema["properties"].items()}
    _check_names("form field", await request.form(), declared)


def _operation(request: Request) -> dict[str, Any]:
    """The request's operation as the OpenAPI document declares it."""
    path = request.scope["route"].path_format
    operation: dict[str, Any] = request.app.openapi()["paths"][path][request.method.lower()]
    return operation


def _takes_many(schema: dict[str, Any]) -> bool:
    options = [schema, *schema.get("anyOf", ())]
    return any(option.get("type") == "array" for option in options)


def _check_names(what: str, sent: ImmutableMultiDict[str, Any], declared: dict[str, bool]) -> None:
    for name in sent:
        if name not in declared:
            takes = ", ".join(declared) or "none"
            raise InvalidInput(name, f"this operation has no such {what}; it takes: {takes}")
        count = len(sent.getlist(name))
        if count > 1 and not declared[name]:
            raise InvalidInput(name, f"sent {count} times; it takes one value")


class _RepeatedKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _object_of_unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise _RepeatedKey(key)
        seen.add(key)
    return dict(pairs)


async def refuse_repeated_json_keys(request: Request) -> None:
    """A JSON body with a key twice in one object is a 422. json.loads keeps the last, other
    parsers (a proxy, an audit log, the client's own) the first: {"epochs": 1, "epochs": 500}
    would be one spec to them and another here. (async: the body is read already.)"""
    media = request.headers.get("content-type", "").partition(";")[0].strip()
    if not is_json(media):
        return
    try:
        json.loads(await request.body(), object_pairs_hook=_object_of_unique_keys)
    except _RepeatedKey as exc:
        raise InvalidInput(
            "body", f"the key {exc.key!r} appears twice in one object; send each key once"
        ) from None
    except (ValueError, RecursionError):
        return  # not JSON json.loads reads: FastAPI's own parse has said why
