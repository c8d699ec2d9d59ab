"""Which webhook targets the gateway may call (server-side request forgery guard).

A job's ``webhook_url`` comes from an API client, and the worker POSTs to it from inside the
deployment, where the cloud metadata endpoint, Redis and the model services are reachable. So by
default a target must resolve only to public (globally routable) addresses. Operators can

- list trusted hosts in ``GLMV_GATEWAY_WEBHOOK_ALLOWED_HOSTS`` (``hooks.example.com``,
  ``*.example.com`` for its subdomains, or an IP literal). A non-empty list is exhaustive: other
  hosts are refused, and listed hosts may be private (an in-cluster receiver);
- or set ``GLMV_GATEWAY_WEBHOOK_ALLOW_PRIVATE=true`` to allow any private address.

The target is checked when the job is submitted (a 400 there) and again right before each delivery
attempt. A name vetted by its addresses is then *pinned*: the request connects to the address that
was checked (``Host`` header and TLS server name keep the name), so DNS cannot answer differently
between the check and the connection (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit


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
class Target:
    """Where a vetted webhook request goes."""

    url: str  # the URL to request: the host replaced by the vetted address when pinned
    headers: dict[str, str] = field(default_factory=dict)  # Host, when pinned
    extensions: dict[str, str] = field(default_factory=dict)  # sni_hostname, when pinned over TLS


def _pin(url: str, address: str) -> Target:
    parts = urlsplit(url)
    host = parts.hostname or ""
    literal = f"[{address}]" if ":" in address else address
    userinfo, _, host_header = parts.netloc.rpartition("@")  # Host: as the client would send it
    netloc = literal if parts.port is None else f"{literal}:{parts.port}"
    if userinfo:
        netloc = f"{userinfo}@{netloc}"
    pinned = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    return Target(pinned, {"Host": host_header}, extensions)


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
        await self.target(url)

    async def target(self, url: str) -> Target:
        """Vet ``url`` and say where to send the request; raises :class:`WebhookRefused`."""
        try:
            parts = urlsplit(url)
            host, port = parts.hostname, parts.port
        except ValueError as exc:
            raise WebhookRefused(f"webhook_url is not a valid URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not host:
            raise WebhookRefused(f"webhook_url must be an http(s) URL with a host, got {url!r}")
        if self.listed(host):
            return Target(url)
        if self.allowed_hosts:
            raise WebhookRefused(f"webhook host {host!r} is not in GLMV_GATEWAY_WEBHOOK_ALLOWED_HOSTS")
        if self.allow_private:
            return Target(url)
        addresses = await self._resolve(host, port or (443 if parts.scheme == "https" else 80))
        private = sorted(a for a in addresses if not _is_public(a))
        if private:
            raise WebhookRefused(
                f"webhook host {host!r} resolves to a non-public address ({', '.join(private)}); "
                "list it in GLMV_GATEWAY_WEBHOOK_ALLOWED_HOSTS to allow it"
            )
        try:
            ipaddress.ip_address(host)
            return Target(url)  # an IP literal: nothing to pin
        except ValueError:
            return _pin(url, sorted(addresses)[0])

    @staticmethod
    async def _resolve(host: str, port: int) -> set[str]:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise WebhookUnresolved(f"webhook host {host!r} does not resolve: {exc}") from None
        return {str(info[4][0]) for info in infos}
