"""Which webhook targets the gateway may call (server-side request forgery guard).

A job's ``webhook_url`` comes from an API client, and the worker POSTs to it from inside the
deployment, where the cloud metadata endpoint, Redis and the model services are reachable. So by
default a target must resolve only to public (globally routable) addresses. Operators can

- list trusted hosts in ``GLMV_GATEWAY_WEBHOOK_ALLOWED_HOSTS`` (``hooks.example.com``,
  ``*.example.com`` for its subdomains, or an IP literal). A non-empty list is exhaustive: other
  hosts are refused, and listed hosts may be private (an in-cluster receiver);
- or set ``GLMV_GATEWAY_WEBHOOK_ALLOW_PRIVATE=true`` to allow any private address.

The target is checked when the job is submitted (a 400 there) and again right before delivery, so a
name that later resolves elsewhere is still refused.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit


class WebhookRefused(ValueError):
    """The URL is not a webhook target this gateway may call; the message says why."""


class WebhookUnresolved(WebhookRefused):
    """The host name does not resolve (refused at submission; retried at delivery: DNS may recover)."""


def _normalise(host: str) -> str:
    return host.strip().lower().rstrip(".")


def parse_host_list(raw: str) -> tuple[str, ...]:
    return tuple(h for h in (_normalise(part) for part in raw.split(",")) if h)


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


@dataclass(frozen=True)
class WebhookPolicy:
    allowed_hosts: tuple[str, ...] = ()
    allow_private: bool = False

    def listed(self, host: str) -> bool:
        host = _normalise(host)
        for pattern in self.allowed_hosts:
            if pattern.startswith("*."):
                if host.endswith(pattern[1:]) and host != pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False

    async def check(self, url: str) -> None:
        """Raise :class:`WebhookRefused` unless ``url`` may be called."""
        try:
            parts = urlsplit(url)
            host, port = parts.hostname, parts.port
        except ValueError as exc:
            raise WebhookRefused(f"webhook_url is not a valid URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not host:
            raise WebhookRefused(f"webhook_url must be an http(s) URL with a host, got {url!r}")
        if self.listed(host):
            return
        if self.allowed_hosts:
            raise WebhookRefused(f"webhook host {host!r} is not in GLMV_GATEWAY_WEBHOOK_ALLOWED_HOSTS")
        if self.allow_private:
            return
        addresses = await self._resolve(host, port or (443 if parts.scheme == "https" else 80))
        private = sorted(a for a in addresses if not _is_public(a))
        if private:
            raise WebhookRefused(
                f"webhook host {host!r} resolves to a non-public address ({', '.join(private)}); "
                "list it in GLMV_GATEWAY_WEBHOOK_ALLOWED_HOSTS to allow it"
            )

    @staticmethod
    async def _resolve(host: str, port: int) -> set[str]:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise WebhookUnresolved(f"webhook host {host!r} does not resolve: {exc}") from None
        return {str(info[4][0]) for info in infos}
