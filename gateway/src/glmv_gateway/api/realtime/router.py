"""``WS /v1/realtime``: the OpenAI Realtime protocol over a gateway session.

Authentication: ``Authorization: Bearer <key>``, the browser subprotocol
``openai-insecure-api-key.<key>`` (answered with the ``realtime`` subprotocol), or ``?api_key=``;
the key may be a client secret from ``POST /v1/realtime/client_secrets``. The beta dialect is
chosen by the header ``OpenAI-Beta: realtime=v1`` (or the subprotocol ``openai-beta.realtime-v1``).

Each connection opens a session in the gateway's session store (its id is ``session.id`` in
``session.created``; ``GET /v1/sessions/{id}/history`` reads the conversation), or attaches to an
existing session of the same key with ``?session_id=``.
"""

from __future__ import annotations

from fastapi import APIRouter, WebSocket
from redis.exceptions import RedisError

from glmv_common.logs import get_logger, kv
from glmv_gateway.api.auth import bearer_key, check_key
from glmv_gateway.api.errors import ApiError, redis_unavailable
from glmv_gateway.api.realtime import secrets
from glmv_gateway.api.realtime.connection import RealtimeConnection, RealtimeConversation
from glmv_gateway.api.realtime.protocol import ProtocolError, beta_session_to_ga
from glmv_gateway.api.realtime.session import SessionView, default_view
from glmv_gateway.api.state import AppState, ws_state
from glmv_gateway.api.websocket_io import deny, serve
from glmv_gateway.conversation.conversation import AudioFormat
from glmv_gateway.schemas import SessionSettings, apply_patch
from glmv_gateway.sessions import SessionNotFound
from glmv_gateway.versions import VersionUnavailable

router = APIRouter()
log = get_logger("glmv.gateway.realtime")
KEY_PROTOCOL = "openai-insecure-api-key."
BETA_PROTOCOL = "openai-beta.realtime-v1"
DEFAULT_MODEL = "glm-4-voice"
# A new realtime session starts as the OpenAI service's does: 24 kHz PCM both ways, server VAD.
REALTIME_DEFAULTS = {
    "output": {"sample_rate": 24000, "encoding": "pcm16"},
    "turn_detection": {"type": "server_vad"},
}


async def authenticate(websocket: WebSocket, state: AppState) -> tuple[str, dict | None]:
    """(the API key the connection acts for, the client secret's session config or None)."""
    offered = websocket.scope.get("subprotocols") or []
    key = bearer_key(websocket.headers.get("authorization"))
    key = key or next((s[len(KEY_PROTOCOL) :] for s in offered if s.startswith(KEY_PROTOCOL)), None)
    key = key or websocket.query_params.get("api_key")
    if key and key.startswith(secrets.SECRET_PREFIX):
        record = await secrets.resolve(state.store, key)
        if record is None:
            raise ApiError(401, "the client secret is unknown or expired")
        return record["owner"], record.get("session") or None
    return await check_key(state, key), None


@router.websocket("/v1/realtime")
async def realtime_socket(websocket: WebSocket) -> None:
    state = ws_state(websocket)
    params = websocket.query_params
    offered = websocket.scope.get("subprotocols") or []
    beta = (
        websocket.headers.get("openai-beta", "").replace(" ", "").lower() == "realtime=v1"
        or BETA_PROTOCOL in offered
    )
    model = params.get("model") or DEFAULT_MODEL
    try:
        api_key, secret_session = await authenticate(websocket, state)
        session_id = params.get("session_id")
        if session_id is None:
            stored = apply_patch(SessionSettings().model_dump(mode="json"), REALTIME_DEFAULTS)
        else:
            stored = (await state.store.get(session_id, owner=api_key)).settings
        settings = SessionSettings.model_validate(stored)
        view = SessionView(
            default_view("", model, settings, state.settings.session_ttl_s), AudioFormat(sample_rate=24000)
        )
        if secret_session:
            planned, patch, fmt = view.plan(
                beta_session_to_ga(secret_session) if beta else secret_session, settings
            )
            settings = SessionSettings.model_validate(apply_patch(settings.model_dump(mode="json"), patch))
            view.view, view.input_format = planned, fmt
        if session_id is None:
            versions = state.clients.registry.assign_all()  # as POST /v1/sessions does
            session = await state.store.create(
                settings.model_dump(mode="json"), owner=api_key, versions=versions
            )
            session_id = session.id
        elif secret_session:
            await state.store.update_settings(session_id, settings.model_dump(mode="json"))
        view.view["id"] = session_id
        conversation = await RealtimeConversation.open(
            state.store,
            state.clients,
            state.settings,
            session_id,
            api_key,
            transport="realtime",
            input_format=view.input_format,
            respond_on_commit=False,
        )
    except ApiError as exc:
        await deny(websocket, exc.status, exc.message)
        return
    except ProtocolError as exc:
        await deny(websocket, 400, exc.message)
        return
    except VersionUnavailable as exc:
        await deny(websocket, exc.status, exc.message)
        return
    except SessionNotFound:
        await deny(websocket, 404, f"session {params.get('session_id')} not found (expired or deleted)")
        return
    except RedisError as exc:
        await deny(websocket, 503, redis_unavailable(exc))
        return
    await websocket.accept(subprotocol="realtime" if "realtime" in offered else None)
    log.info("realtime connection", extra=kv(session_id=session_id, beta=beta, model=model))
    connection = RealtimeConnection(websocket, conversation, view, beta=beta)
    connection.send({"type": "session.created", "session": view.view})
    await serve(
        websocket,
        conversation,
        on_text=connection.on_text,
        on_bytes=connection.on_bytes,
        send_event=connection.send_event,
    )
