"""The webhook SSRF guard: which targets a job's webhook may name, checked again at delivery."""

from __future__ import annotations

import httpx
import pytest

from glmv_gateway.jobs.webhook import deliver, verify
from glmv_gateway.jobs.webhook_policy import WebhookPolicy, WebhookRefused, _pin, parse_host_list
from glmv_gateway.settings import GatewaySettings

from .webhook_server import WebhookReceiver

NON_PUBLIC = [
    "http://127.0.0.1:8080/hook",
    "http://localhost/hook",
    "http://10.1.2.3/",
    "http://192.168.0.10/",
    "http://172.16.5.5/",
    "http://169.254.169.254/latest/meta-data/",  # cloud metadata
    "http://100.64.0.1/",  # carrier-grade NAT
    "http://0.0.0.0/",
    "http://224.0.0.1/",
    "http://[::1]/",
    "http://[fe80::1]/",
    "http://[fd00::1]/",
    "http://[::ffff:127.0.0.1]/",  # IPv4-mapped loopback
    "http://2130706433/",  # 127.0.0.1 written as one integer
]


@pytest.mark.parametrize("url", NON_PUBLIC)
async def test_default_policy_refuses_non_public_targets(url: str) -> None:
    with pytest.raises(WebhookRefused, match="non-public address"):
        await WebhookPolicy().check(url)


@pytest.mark.parametrize("url", ["http://8.8.8.8/hook", "https://[2001:4860:4860::8888]:8443/x"])
async def test_default_policy_allows_public_addresses(url: str) -> None:
    await WebhookPolicy().check(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://8.8.8.8/x", r"http\(s\) URL"),
        ("http:///nohost", r"http\(s\) URL"),
        ("http://8.8.8.8:99999/", "not a valid URL"),
        ("http://no-such-host.invalid/", "does not resolve"),
    ],
)
async def test_malformed_or_unresolvable_targets_are_refused(url: str, message: str) -> None:
    with pytest.raises(WebhookRefused, match=message):
        await WebhookPolicy().check(url)


async def test_allow_list_is_exhaustive_and_trusts_its_hosts() -> None:
    policy = WebhookPolicy(parse_host_list(" Hooks.Example.com., *.internal.example ,10.0.0.7"))
    await policy.check("https://hooks.example.com/x")  # case and trailing dot do not matter
    await policy.check("http://10.0.0.7:9000/x")  # listed, so private is fine
    assert policy.listed("a.b.internal.example")
    assert not policy.listed("internal.example")  # *.suffix is for subdomains only
    assert not policy.listed("evilinternal.example")
    for url in ("http://8.8.8.8/", "http://10.0.0.8/", "http://internal.example/"):
        with pytest.raises(WebhookRefused, match="not in GLMV_GATEWAY_WEBHOOK_ALLOWED_HOSTS"):
            await policy.check(url)


async def test_allow_private_switch() -> None:
    await WebhookPolicy(allow_private=True).check("http://127.0.0.1:1/x")


def test_settings_build_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLMV_GATEWAY_WEBHOOK_ALLOWED_HOSTS", "a.example, *.b.example")
    monkeypatch.setenv("GLMV_GATEWAY_WEBHOOK_ALLOW_PRIVATE", "true")
    policy = GatewaySettings().webhook_policy()
    assert policy == WebhookPolicy(("a.example", "*.b.example"), True)


async def test_delivery_rechecks_the_target_and_never_calls_a_refused_one() -> None:
    with WebhookReceiver() as hook:
        refused = await deliver(
            hook.url, {"job_id": "j1"}, secret="s", policy=WebhookPolicy(), retries=2, backoff_s=0.01
        )
        allowed = await deliver(
            hook.url,
            {"job_id": "j2"},
            secret="s",
            policy=WebhookPolicy(("127.0.0.1",)),
            retries=0,
            backoff_s=0.01,
        )
    assert refused[0] is False and refused[1].startswith("refused: ") and "non-public" in refused[1]
    assert allowed == (True, "HTTP 204")
    assert hook.attempts == 1 and hook.payloads() == [{"job_id": "j2"}]
    headers, body = hook.received[0]
    assert verify(body, "s", headers["x-glmv-signature"])


async def test_unresolvable_target_is_retried_at_delivery() -> None:
    ok, status = await deliver(
        "http://no-such-host.invalid/hook",
        {"job_id": "j"},
        secret="s",
        policy=WebhookPolicy(),
        retries=1,
        backoff_s=0.01,
    )
    assert not ok and "does not resolve" in status and not status.startswith("refused")


async def test_a_vetted_name_is_pinned_to_the_checked_address(monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the request goes to the address that passed the check, not a fresh lookup."""

    async def resolve(host: str, port: int) -> set[str]:
        if host == "8.8.8.8":
            return {host}
        assert (host, port) == ("hooks.example.com", 8443)
        return {"93.184.216.34"}

    monkeypatch.setattr(WebhookPolicy, "_resolve", staticmethod(resolve))
    target = await WebhookPolicy().target("https://u:p@Hooks.Example.com:8443/hook?x=1#frag")
    assert target.url == "https://u:p@93.184.216.34:8443/hook?x=1"
    assert target.headers == {"Host": "Hooks.Example.com:8443"}
    assert target.extensions == {"sni_hostname": "hooks.example.com"}
    # IP literals and trusted hosts are used as given
    assert (await WebhookPolicy().target("http://8.8.8.8/h")).url == "http://8.8.8.8/h"
    assert (await WebhookPolicy(("hooks.example.com",)).target("http://hooks.example.com/")).headers == {}


async def test_a_pinned_request_reaches_the_address_with_the_original_host() -> None:
    with WebhookReceiver() as hook:
        port = hook.server.server_address[1]
        target = _pin(f"http://user:pw@receiver.example:{port}/hook?a=1", "127.0.0.1")
        async with httpx.AsyncClient() as client:
            response = await client.post(
                target.url, content=b"{}", headers=target.headers, extensions=target.extensions
            )
    assert response.status_code == 204
    headers, _ = hook.received[0]
    assert headers["host"] == f"receiver.example:{port}"
    assert headers["authorization"] == "Basic dXNlcjpwdw=="  # user:pw survives the pinning
