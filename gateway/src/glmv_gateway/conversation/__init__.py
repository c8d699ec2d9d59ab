"""The conversation core: one transport-independent duplex session and the turn steps under it.

``admission`` (may this turn run?), ``pump`` (LM → chunker → decoder), ``record`` (usage,
timings, metrics, history, the cut to what was heard), ``events`` (what clients receive),
``turn`` (one turn's event stream), ``conversation`` (the duplex session transports wrap).
"""

from __future__ import annotations

from glmv_gateway.clients import ServiceClients
from glmv_gateway.conversation.admission import UserInput, admit
from glmv_gateway.conversation.errors import TurnRejected
from glmv_gateway.conversation.turn import TurnRun
from glmv_gateway.sessions import SessionStore
from glmv_gateway.settings import GatewaySettings

__all__ = ["TurnRejected", "TurnRun", "UserInput", "prepare_turn"]


async def prepare_turn(
    store: SessionStore,
    clients: ServiceClients,
    config: GatewaySettings,
    *,
    session_id: str,
    api_key: str,
    user_input: UserInput,
    speech_ended_at: float | None = None,
) -> TurnRun:
    """Admit a turn (raises :class:`TurnRejected`) and return it ready to stream."""
    admitted = await admit(
        store, clients, config, session_id=session_id, api_key=api_key, user_input=user_input
    )
    return TurnRun(clients, config, admitted, speech_ended_at=speech_ended_at)
