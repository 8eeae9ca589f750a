"""create_app(): the FastAPI application, its routers, its lifespan and its error handling."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api.auth import install_auth
from app.api.browser_policy import install_browser_policy
from app.api.dashboard.router import router as dashboard_router
from app.api.datasets.router import router as datasets_router
from app.api.errors import document_errors, error_responses, install_error_handlers
from app.api.events.hub import EventHub
from app.api.events.router import router as events_router
from app.api.events.service import StreamSlots
from app.api.jobs.router import router as jobs_router
from app.api.limits import BodySizeLimit, HeadSizeLimit
from app.api.observability import RequestObservability
from app.api.studies.router import router as studies_router
from app.api.system.router import metrics_router
from app.api.system.router import router as system_router
from app.core.broker import create_celery_app
from app.core.config import Settings, get_settings
from app.core.db import create_db_engine, create_reader, create_session_factory
from app.core.outbox import Dispatcher


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_db_engine(settings.database_url)
        app.state.settings = settings
        install_auth(app.state, settings)
        app.state.session_factory = create_session_factory(engine)
        app.state.reader = create_reader(engine)
        app.state.dispatcher = Dispatcher(
            create_celery_app(settings), app.state.session_factory, settings.publish_pause_seconds
        )
        app.state.event_hub = EventHub(
            app.state.session_factory,
            settings.event_poll_seconds,
            settings.event_stream_max_seconds,
        )
        app.state.stream_slots = StreamSlots(settings.tenant_max_streams)
        yield
        await app.state.event_hub.close()
        await app.state.reader.close()
        engine.dispose()

    app = FastAPI(
        title="trainsvc",
        version="0.1.0",
        description="Run and compare neural-network training jobs: what do normalization and "
        "dropout do to training?",
        lifespan=lifespan,
        # /v1/jobs/ is no route: a 404 in our error shape, not a 307 whose Location is built
        # from the client's Host header.
        redirect_slashes=False,
    )
    # Every operation that reads or writes the database answers 503 while it is away.
    app.include_router(jobs_router, responses=error_responses(503))
    app.include_router(datasets_router, responses=error_responses(503))
    app.include_router(events_router, responses=error_responses(503))
    app.include_router(studies_router, responses=error_responses(503))
    app.include_router(system_router)
    app.include_router(metrics_router)
    app.include_router(dashboard_router)  # static pages at /, after every API route
    install_error_handlers(app)
    document_errors(app)
    app.add_middleware(
        BodySizeLimit,
        default_limit=settings.max_body_bytes,
        upload_limit=settings.max_upload_bytes,
        upload_paths=("/v1/datasets",),
    )
    app.add_middleware(HeadSizeLimit, limit=settings.http_max_header_bytes)
    # Every response, an error or a 413 or 431 included.
    install_browser_policy(app, settings.cors_origins)
    # Outermost: the request id is set before anything else logs, and a 413 or 431 is counted.
    app.add_middleware(RequestObservability)
    return app
