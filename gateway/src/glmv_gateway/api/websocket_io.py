"""What every WebSocket transport shares: refusing a handshake with a JSON error, and pumping a
conversation's events out while frames come in (the socket closing ends the conversation)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from fastapi import WebSocket, WebSocketDisconnect
from starlette.responses import JSONResponse

from glmv_gateway.api.errors import error_body
from glmv_gateway.conversation.conversation import Conversation
from glmv_gateway.conversation.events import Event


async def deny(websocket: WebSocket, status: int, message: str) -> None:
    """Refuse the handshake with an HTTP status and the usual error body."""
    try:
        await websocket.send_denial_response(JSONResponse(error_body(status, message), status_code=status))
    except RuntimeError:  # server without the denial-response extension
        await websocket.close(code=1008, reason=message[:120])


async def serve(
    websocket: WebSocket,
    conversation: Conversation,
    *,
    on_text: Callable[[str], Awaitable[None]],
    on_bytes: Callable[[bytes], Awaitable[None]],
    send_event: Callable[[Event], Awaitable[None]],
) -> None:
    """Read frames until the client goes; meanwhile send every event. Always closes the
    conversation (its reply stops and is stored as far as it was heard)."""

    async def pump_out() -> None:
        async for event in conversation.events():
            await send_event(event)

    async def pump_in() -> None:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                await on_bytes(message["bytes"])
            elif message.get("text") is not None:
                await on_text(message["text"])

    # one reader task for the whole connection (not one per frame: a phone line sends 50 a second)
    sender = asyncio.create_task(pump_out())
    receiver = asyncio.create_task(pump_in())
    try:
        await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
        if receiver.done():
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                receiver.result()  # anything else is a bug: raised
    finally:
        if not receiver.done():  # the sender ended (conversation closed) or failed (socket gone)
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await receiver
        await conversation.close()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(sender, timeout=5)
        if not sender.done():
            sender.cancel()
