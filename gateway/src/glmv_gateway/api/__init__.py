"""HTTP and WebSocket routes (thin: parsing, auth and status codes; the work is in turn.py)."""

from glmv_gateway.api.app import create_app

__all__ = ["create_app"]
