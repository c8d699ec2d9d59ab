"""Webhook delivery: POST the job's JSON summary, signed with HMAC-SHA256, retried with backoff.

Headers: ``X-GLMV-Signature: sha256=<hex HMAC of the raw body>``, ``X-GLMV-Job-Id`` (receivers can
deduplicate by it: delivery is at least once).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from typing import Any

import httpx

from glmv_common.logs import get_logger, kv
from glmv_gateway.jobs.webhook_policy import WebhookPolicy, WebhookRefused, WebhookUnresolved

log = get_logger("glmv.jobs.webhook")


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: str, signature: str) -> bool:
    return hmac.compare_digest(sign(body, secret), signature)


async def deliver(
    url: str,
    payload: dict[str, Any],
    *,
    secret: str,
    policy: WebhookPolicy,
    retries: int,
    backoff_s: float,
    timeout_s: float = 10.0,
) -> tuple[bool, str]:
    """Returns (delivered, last status or error). The target is re-checked against ``policy`` before
    every attempt: what it resolves to may have changed since the job was submitted."""
    body = json.dumps(payload, sort_keys=True).encode()
    headers = {
        "Content-Type": "application/json",
        "X-GLMV-Signature": sign(body, secret),
        "X-GLMV-Job-Id": str(payload.get("job_id", "")),
        "User-Agent": "glmvoice-webhook/1",
    }
    delay = backoff_s
    last = ""
    async with httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client:
        for attempt in range(retries + 1):
            try:
                target = await policy.target(url)
                response = await client.post(
                    target.url,
                    content=body,
                    headers={**headers, **target.headers},
                    extensions=target.extensions,
                )
                last = f"HTTP {response.status_code}"
                if 200 <= response.status_code < 300:
                    return True, last
            except WebhookUnresolved as exc:
                last = str(exc)
            except WebhookRefused as exc:
                log.warning("webhook refused", extra=kv(url=url, reason=str(exc)))
                return False, f"refused: {exc}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            log.warning("webhook attempt failed", extra=kv(url=url, attempt=attempt + 1, result=last))
            if attempt < retries:
                await asyncio.sleep(delay)
                delay *= 2
    return False, last
