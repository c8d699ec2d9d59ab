"""Phone-line adapters: Twilio Media Streams (WebSocket) and Asterisk AudioSocket (TCP), codecs over
``Conversation`` sharing one call life cycle (``calls``)."""

from __future__ import annotations

from glmv_gateway.api.telephony.twilio import router

__all__ = ["router"]
