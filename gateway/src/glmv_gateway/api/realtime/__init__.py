"""The OpenAI Realtime API over the gateway's ``Conversation``: ``protocol`` (client events, beta
names), ``session`` (the session object ↔ settings), ``connection`` (the codec), ``router`` (the
WebSocket), ``secrets`` (short-lived client secrets)."""
