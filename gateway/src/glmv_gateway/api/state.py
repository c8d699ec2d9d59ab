"""Objects the routes share, created once per process in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request, WebSocket

from glmv_gateway.clients import ServiceClients
from glmv_gateway.sessions import SessionStore
from glmv_gateway.settings import GatewaySettings

if TYPE_CHECKING:
    from glmv_gateway.api.telephony.calls import CallManager


@dataclass
class AppState:
    settings: GatewaySettings
    store: SessionStore
    clients: ServiceClients
    calls: CallManager


def app_state(request: Request) -> AppState:
    return request.app.state.glmv


def ws_state(websocket: WebSocket) -> AppState:
    return websocket.app.state.glmv
