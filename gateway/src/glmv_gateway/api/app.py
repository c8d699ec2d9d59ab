"""The FastAPI application: state in the lifespan, routers, error handlers."""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator

from fastapi import FastAPI

from glmv_common.logs import get_logger, kv, setup_logging
from glmv_common.parent import watch_parent
from glmv_gateway.api import demo, health, jobs, models, openapi, sessions, telephony, turns, ws
from glmv_gateway.api.errors import install_error_handlers
from glmv_gateway.api.limits import SettingsBodyLimit
from glmv_gateway.api.options import OptionsResponder
from glmv_gateway.api.realtime import router as realtime
from glmv_gateway.api.realtime import secrets as realtime_secrets
from glmv_gateway.api.state import AppState
from glmv_gateway.api.telephony.audiosocket import AudioSocketServer
from glmv_gateway.api.telephony.calls import CallManager
from glmv_gateway.clients import ServiceClients
from glmv_gateway.jobs.worker import make_celery
from glmv_gateway.sessions import SessionStore
from glmv_gateway.settings import GatewaySettings
from glmv_gateway.versions import version_problems

log = get_logger("glmv.gateway")
VERSION = "0.1.0"


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        clients = ServiceClients.from_settings(settings)
        store = SessionStore.from_url(
            settings.redis_url,
            settings.session_ttl_s,
            settings.lock_ttl_s,
            settings.redis_timeout_s,
            versions=clients.registry,
        )
        calls = CallManager(store, clients, settings)
        app.state.glmv = AppState(settings=settings, store=store, clients=clients, calls=calls)
        audiosocket = AudioSocketServer(calls, settings) if settings.audiosocket_port else None
        if audiosocket is not None:
            await audiosocket.start()
        app.state.celery = make_celery(settings)
        # first probe of every version (incompatible ones are refused and logged), then keep watching
        await clients.start(settings.versions_poll_s)
        problems = version_problems(clients.registry)
        if problems:
            log.error("model services are incompatible: %s", "; ".join(problems))
        elif clients.registry.lm_info is None:
            log.warning("model services not reachable yet; /readyz reports them")
        else:
            log.info("model services compatible", extra=kv(**clients.addrs))
        yield
        if audiosocket is not None:
            await audiosocket.stop()
        await calls.close()
        await clients.close()
        await store.redis.aclose()

    app = FastAPI(
        title="GLM-4-Voice gateway",
        version=VERSION,
        description="Spoken turns with GLM-4-Voice: audio or text in, interleaved text and speech out.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(SettingsBodyLimit, limit=settings.max_settings_bytes)
    app.add_middleware(OptionsResponder)
    app.include_router(health.router)
    app.include_router(sessions.router)
    app.include_router(models.router)
    app.include_router(turns.router)
    app.include_router(ws.router)
    app.include_router(jobs.router)
    app.include_router(realtime.router)
    app.include_router(realtime_secrets.router)
    if settings.demo_page:
        app.include_router(demo.router)
    app.include_router(telephony.router)
    openapi.install(app)
    return app


def main() -> None:
    import uvicorn

    settings = GatewaySettings()
    setup_logging("gateway", settings.log_level, settings.log_format)
    watch_parent()
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        ws="websockets",
        # SIGTERM (a rolling update): no new connections, running turns stream to their end
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s),
    )
