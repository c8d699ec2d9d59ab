"""Component versions side by side: the registry of tokenizer and decoder versions (id → addresses,
weight, draining), their health and compatibility with the LM, each session's assignment, and the
LM replicas a session's turns go to (rendezvous hashing on the session id, so its prefix cache is hit).

The registry comes from a JSON file (``GLMV_GATEWAY_VERSIONS_FILE``), re-read when it changes::

    {"decoder": [{"id": "v1", "addresses": ["10.0.0.5:50053"], "weight": 1.0, "draining": false}],
     "tokenizer": [...]}

A component absent from the file (or no file at all) has one version at the gateway's
``*_ADDR`` setting, whose id is the ``model_version`` the service reports in ``ModelInfo``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from glmv_common.logs import get_logger, kv
from glmv_gateway import metrics
from glmvoice.v1 import common_pb2, decoder_pb2_grpc, lm_pb2_grpc, tokenizer_pb2_grpc

log = get_logger("glmv.gateway.versions")

VERSIONED = ("tokenizer", "decoder")
SERVICE_NAMES = {
    "tokenizer": "glmvoice.v1.SpeechTokenizer",
    "lm": "glmvoice.v1.LanguageModel",
    "decoder": "glmvoice.v1.SpeechDecoder",
}
_STUBS: dict[str, Callable[[grpc.aio.Channel], Any]] = {
    "tokenizer": tokenizer_pb2_grpc.SpeechTokenizerStub,
    "lm": lm_pb2_grpc.LanguageModelStub,
    "decoder": decoder_pb2_grpc.SpeechDecoderStub,
}
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    # with a dns:/// target of a headless service, spread calls over every ready replica
    ("grpc.lb_policy_name", "round_robin"),
]
MAX_PINS = 100_000  # sessions whose versions this process remembers (the record in Redis is the truth)


class VersionUnavailable(LookupError):
    """A requested version cannot take new sessions (unknown, draining, failed or incompatible);
    ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


# --- the file ------------------------------------------------------------------------------------


class VersionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    addresses: list[str] = Field(..., min_length=1)
    weight: float = Field(1.0, ge=0)
    draining: bool = False

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        if any(not a.strip() for a in value):
            raise ValueError("addresses must be non-empty host:port strings")
        return [a.strip() for a in value]


class RegistryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tokenizer: list[VersionSpec] | None = None
    decoder: list[VersionSpec] | None = None

    @field_validator("tokenizer", "decoder")
    @classmethod
    def _unique(cls, value: list[VersionSpec] | None) -> list[VersionSpec] | None:
        if value is not None:
            if not value:
                raise ValueError("a component listed in the file needs at least one version")
            ids = [v.id for v in value]
            if len(ids) != len(set(ids)):
                raise ValueError(f"duplicate version ids: {ids}")
        return value


def load_registry_file(path: Path) -> RegistryFile:
    """Parse and validate the file; raises ``ValueError`` with a readable message."""
    try:
        return RegistryFile.model_validate(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, ValidationError) as exc:
        raise ValueError(f"versions file {path}: {exc}") from None


# --- live state ----------------------------------------------------------------------------------


def describe(info: common_pb2.ModelInfo | None, label: str) -> str:
    if info is None:
        return label
    return (
        f"{label} ({info.model_id}, model version {info.model_version or '?'}, "
        f"checkpoint {info.checkpoint_fingerprint[:12]})"
    )


def compatibility_with_lm(
    component: str, version_id: str, info: common_pb2.ModelInfo, lm: common_pb2.ModelInfo
) -> list[str]:
    """Why one tokenizer or decoder version cannot serve with the LM (empty when it can)."""
    me, them = describe(info, f"{component} {version_id}"), describe(lm, "the lm")
    problems = []
    lm_codes = lm.audio_token_count or lm.codebook_size
    if info.codebook_size != lm_codes:
        problems.append(f"{me} has {info.codebook_size} speech codes but {them} has {lm_codes} audio tokens")
    lm_rate = lm.token_rate_hz or info.token_rate_hz
    if abs(info.token_rate_hz - lm_rate) > 1e-6:
        problems.append(f"{me} runs at {info.token_rate_hz:g} tokens/s but {them} at {lm_rate:g} tokens/s")
    return problems


@dataclass
class Endpoint:
    """One address of a version (or one LM replica) with its last health answer."""

    address: str
    health: str = "UNKNOWN"
    info: common_pb2.ModelInfo | None = None

    @property
    def serving(self) -> bool:
        return self.health == "SERVING"


@dataclass
class Version:
    component: str
    spec_id: str  # "" when the id comes from ModelInfo (no file entry for the component)
    endpoints: list[Endpoint]
    weight: float = 1.0
    draining: bool = False
    problems: list[str] = field(default_factory=list)
    _next: int = 0

    @property
    def id(self) -> str:
        if self.spec_id:
            return self.spec_id
        info = self.info
        return (info.model_version or info.checkpoint_fingerprint[:12]) if info else "default"

    @property
    def info(self) -> common_pb2.ModelInfo | None:
        return next((e.info for e in self.endpoints if e.info is not None), None)

    @property
    def health(self) -> str:
        if any(e.serving for e in self.endpoints):
            return "SERVING"
        return self.endpoints[0].health if self.endpoints else "NO_ADDRESSES"

    @property
    def probed(self) -> bool:
        return any(e.health != "UNKNOWN" for e in self.endpoints)

    @property
    def failed(self) -> bool:
        """Unhealthy after a probe, or refused as incompatible: its sessions move elsewhere."""
        return bool(self.problems) or (self.probed and self.health != "SERVING")

    @property
    def eligible(self) -> bool:
        """May take new sessions."""
        return not self.draining and self.health == "SERVING" and not self.problems and self.info is not None

    def address(self) -> str:
        """Round robin over the serving addresses (all of them when none is known to serve)."""
        pool = [e for e in self.endpoints if e.serving] or self.endpoints
        self._next = (self._next + 1) % len(pool)
        return pool[self._next].address


def _hrw(session_id: str, address: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{session_id}|{address}".encode(), digest_size=8).digest(), "big")


class ChannelPool:
    """One gRPC channel per address, shared by every version that names it."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        return channel

    def stub(self, component: str, address: str) -> Any:
        return _STUBS[component](self.get(address))

    async def retain(self, addresses: set[str]) -> None:
        """Close the channels of addresses no longer in use."""
        gone = [a for a in self._channels if a not in addresses]
        await asyncio.gather(*(self._channels.pop(a).close(grace=5) for a in gone))

    async def close(self) -> None:
        await asyncio.gather(*(ch.close() for ch in self._channels.values()))
        self._channels.clear()


class VersionRegistry:
    """Versions of the tokenizer and decoder, LM replicas, health probes, session assignment."""

    def __init__(
        self,
        addrs: dict[str, str],
        *,
        lm_addrs: list[str] | None = None,
        versions_file: str | Path | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.addrs = addrs
        self.file = Path(versions_file) if versions_file else None
        self.channels = ChannelPool()
        self.rng = rng or random.Random()
        self.lm = [Endpoint(a) for a in (lm_addrs or [addrs["lm"]])]
        self.versions: dict[str, list[Version]] = {}
        self.file_error: str | None = None
        self._file_stamp: tuple[float, int] | None = None
        self._pins: OrderedDict[str, dict[str, str]] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._apply(RegistryFile())
        if self.file is not None:
            self.reload(force=True)

    # -- the registry file -----------------------------------------------------------------------

    def _apply(self, parsed: RegistryFile) -> None:
        old = {(c, v.id): v for c, vs in self.versions.items() for v in vs}
        versions: dict[str, list[Version]] = {}
        for component in VERSIONED:
            specs = getattr(parsed, component)
            if specs is None:
                previous = [v for v in self.versions.get(component, []) if not v.spec_id]
                versions[component] = previous or [Version(component, "", [Endpoint(self.addrs[component])])]
                continue
            versions[component] = []
            for spec in specs:
                known = old.get((component, spec.id))
                endpoints = {e.address: e for e in known.endpoints} if known else {}
                versions[component].append(
                    Version(
                        component,
                        spec.id,
                        [endpoints.get(a) or Endpoint(a) for a in spec.addresses],
                        weight=spec.weight,
                        draining=spec.draining,
                        problems=list(known.problems) if known else [],
                    )
                )
        self.versions = versions
        self._update_gauges()

    def reload(self, *, force: bool = False) -> bool:
        """Re-read the file if it changed; True when the registry changed. A bad file keeps the last
        good registry and is reported by /readyz and /v1/models."""
        if self.file is None:
            return False
        try:
            st = self.file.stat()
            stamp = (st.st_mtime, st.st_size)
        except OSError as exc:
            stamp = None
            if force or self._file_stamp is not None:
                self.file_error = f"versions file {self.file}: {exc}"
                log.error("versions file unreadable; keeping the last registry", extra=kv(error=str(exc)))
            self._file_stamp = None
            return False
        if stamp == self._file_stamp and not force:
            return False
        self._file_stamp = stamp
        try:
            parsed = load_registry_file(self.file)
        except ValueError as exc:
            self.file_error = str(exc)
            log.error("versions file invalid; keeping the last registry", extra=kv(error=str(exc)))
            return False
        self.file_error = None
        self._apply(parsed)
        log.info(
            "versions registry loaded",
            extra=kv(
                file=str(self.file),
                **{
                    c: ",".join(f"{v.id}:{v.weight:g}{'(draining)' if v.draining else ''}" for v in vs)
                    for c, vs in self.versions.items()
                },
            ),
        )
        return True

    def addresses(self) -> set[str]:
        return {e.address for vs in self.versions.values() for v in vs for e in v.endpoints} | {
            e.address for e in self.lm
        }

    # -- probes ----------------------------------------------------------------------------------

    async def _probe_endpoint(self, component: str, endpoint: Endpoint, timeout: float) -> None:
        channel = self.channels.get(endpoint.address)
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAMES[component]), timeout=timeout
            )
            endpoint.health = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as error:
            endpoint.health = f"unreachable ({error.code().name})"
            return
        if endpoint.serving:
            try:
                endpoint.info = await self.channels.stub(component, endpoint.address).GetInfo(
                    common_pb2.GetInfoRequest(), timeout=timeout
                )
            except grpc.aio.AioRpcError as error:
                endpoint.health = f"no info ({error.code().name})"

    @property
    def lm_info(self) -> common_pb2.ModelInfo | None:
        return next((e.info for e in self.lm if e.serving and e.info is not None), None) or next(
            (e.info for e in self.lm if e.info is not None), None
        )

    async def probe(self, timeout: float = 2.0) -> None:
        """Health and ModelInfo of every address; then each version's compatibility with the LM."""
        jobs = [self._probe_endpoint("lm", e, timeout) for e in self.lm]
        for component, vs in self.versions.items():
            jobs += [self._probe_endpoint(component, e, timeout) for v in vs for e in v.endpoints]
        await asyncio.gather(*jobs)
        lm = self.lm_info
        for vs in self.versions.values():
            for v in vs:
                was = list(v.problems)
                info = v.info
                if info is None or lm is None:
                    continue  # nothing new to compare: a refusal stands until the version or the LM changes
                v.problems = compatibility_with_lm(v.component, v.id, info, lm)
                if v.problems and v.problems != was:
                    log.error(
                        "version refused: incompatible with the LM",
                        extra=kv(component=v.component, version=v.id, problems="; ".join(v.problems)),
                    )
        self._update_gauges()

    def _update_gauges(self) -> None:
        shares = self.shares()
        for component, vs in self.versions.items():
            for v in vs:
                metrics.VERSION_UP.labels(component, v.id).set(1 if v.eligible else 0)
                metrics.VERSION_SHARE.labels(component, v.id).set(shares[component].get(v.id, 0.0))
        for e in self.lm:
            metrics.LM_REPLICA_UP.labels(e.address).set(1 if e.serving else 0)

    async def start(self, interval_s: float = 1.0) -> None:
        """First probe now, then watch the file and probe every ``interval_s`` in the background."""
        await self.probe()
        self._task = asyncio.create_task(self._watch(interval_s), name="versions-watch")

    async def _watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                if self.reload():
                    await self.channels.retain(self.addresses())
                await self.probe()
            except Exception:  # a probe must never end the watch
                log.exception("versions probe failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.channels.close()

    # -- selection -------------------------------------------------------------------------------

    def find(self, component: str, version_id: str) -> Version | None:
        return next((v for v in self.versions.get(component, []) if v.id == version_id), None)

    def shares(self) -> dict[str, dict[str, float]]:
        """Traffic share of new sessions per version (weights over the eligible versions; equal
        shares when every eligible version has weight 0)."""
        out: dict[str, dict[str, float]] = {}
        for component, vs in self.versions.items():
            eligible = [v for v in vs if v.eligible]
            total = sum(v.weight for v in eligible)
            out[component] = {
                v.id: ((v.weight / total) if total > 0 else 1 / len(eligible)) if v in eligible else 0.0
                for v in vs
            }
        return out

    def assign(self, component: str, requested: str | None = None) -> str:
        """A version for a new session: ``requested`` if it may take sessions, else by weight."""
        vs = self.versions[component]
        if requested is not None:
            v = self.find(component, requested)
            if v is None:
                known = ", ".join(x.id for x in vs)
                raise VersionUnavailable(404, f"unknown {component} version {requested!r} (known: {known})")
            if not v.eligible:
                why = (
                    "is draining"
                    if v.draining
                    else "is incompatible: " + "; ".join(v.problems)
                    if v.problems
                    else f"is not serving ({v.health})"
                )
                raise VersionUnavailable(409, f"{component} version {requested} {why}")
            return v.id
        shares = self.shares()[component]
        ids = [i for i, s in shares.items() if s > 0]
        if not ids:
            states = ", ".join(f"{v.id}: {self.state_of(v)}" for v in vs)
            raise VersionUnavailable(503, f"no {component} version takes new sessions ({states})")
        return self.rng.choices(ids, weights=[shares[i] for i in ids])[0]

    @staticmethod
    def state_of(v: Version) -> str:
        if v.problems:
            return "incompatible"
        if v.draining:
            return "draining"
        return v.health.lower() if v.health != "SERVING" else "serving"

    def assign_all(self, requested: dict[str, str] | None = None) -> dict[str, str]:
        requested = requested or {}
        unknown = set(requested) - set(VERSIONED)
        if unknown:
            raise VersionUnavailable(400, f"versions can be chosen for {', '.join(VERSIONED)}, not {unknown}")
        chosen: dict[str, str] = {}
        for component in VERSIONED:
            try:
                chosen[component] = self.assign(component, requested.get(component))
            except VersionUnavailable:
                if component in requested:
                    raise
                # nothing serves right now: the session is created all the same and gets its
                # version when it is next loaded (as a session did before versions existed)
                continue
            metrics.VERSION_SESSIONS.labels(component, chosen[component]).inc()
        return chosen

    def resolve(self, session_id: str, pinned: dict[str, str]) -> tuple[dict[str, str], list[dict[str, Any]]]:
        """The versions a session keeps: its pins, except those whose version disappeared or failed,
        which move to a version that takes sessions (one ``session.version_moved`` event each)."""
        result = dict(pinned)
        events: list[dict[str, Any]] = []
        for component in VERSIONED:
            current = pinned.get(component)
            v = self.find(component, current) if current else None
            if v is not None and not v.failed:
                continue
            try:
                target = self.assign(component)
            except VersionUnavailable:
                continue  # nowhere to go: keep the pin; the turn will report the failing service
            result[component] = target
            if current is None:
                metrics.VERSION_SESSIONS.labels(component, target).inc()
                continue
            reason = "removed" if v is None else ("incompatible" if v.problems else "failed")
            event = {
                "type": "session.version_moved",
                "session_id": session_id,
                "component": component,
                "from_version": current,
                "to_version": target,
                "reason": reason,
            }
            events.append(event)
            metrics.VERSION_MOVES.labels(component, current, target).inc()
            log.warning(
                "session moved to another %s version: %s -> %s (%s)",
                component,
                current,
                target,
                reason,
                extra=kv(session_id=session_id, component=component, from_version=current, to_version=target),
            )
        self.remember(session_id, result)
        return result, events

    def remember(self, session_id: str, versions: dict[str, str]) -> None:
        self._pins[session_id] = dict(versions)
        self._pins.move_to_end(session_id)
        while len(self._pins) > MAX_PINS:
            self._pins.popitem(last=False)

    def forget(self, session_id: str) -> None:
        self._pins.pop(session_id, None)

    def pinned(self, session_id: str, component: str) -> str | None:
        return self._pins.get(session_id, {}).get(component)

    def address_for(self, component: str, version_id: str | None, session_id: str = "") -> tuple[str, str]:
        """(version id, address) a call goes to: the given version, else the session's pin as last
        loaded here, else a weighted choice; a version that vanished falls back to a weighted choice."""
        vid = version_id or (self.pinned(session_id, component) if session_id else None)
        v = self.find(component, vid) if vid else None
        if v is None:
            try:
                v = self.find(component, self.assign(component))
            except VersionUnavailable:
                v = None
            v = v or self.versions[component][0]
        return v.id, v.address()

    def lm_ranking(self, session_id: str) -> list[Endpoint]:
        """LM replicas in this session's preference order (rendezvous hashing: adding or removing
        a replica moves only the sessions that hashed to it)."""
        return sorted(self.lm, key=lambda e: _hrw(session_id, e.address), reverse=True)

    def lm_address(self, session_id: str) -> str:
        """The session's preferred LM replica, or the next one in its order while that is down."""
        if len(self.lm) == 1:
            return self.lm[0].address
        ranking = self.lm_ranking(session_id or str(self.rng.random()))
        for e in ranking:
            if e.health in ("SERVING", "UNKNOWN"):
                return e.address
        return ranking[0].address

    # -- reports ---------------------------------------------------------------------------------

    def describe_versions(self) -> dict[str, Any]:
        shares = self.shares()
        lm = self.lm_info
        out: dict[str, Any] = {}
        for component, vs in self.versions.items():
            rows = []
            for v in vs:
                info = v.info
                rows.append(
                    {
                        "id": v.id,
                        "addresses": [{"address": e.address, "health": e.health} for e in v.endpoints],
                        "weight": v.weight,
                        "draining": v.draining,
                        "health": v.health,
                        "state": self.state_of(v),
                        "compatible": not v.problems if info and lm else None,
                        "problems": v.problems,
                        "traffic_share": round(shares[component][v.id], 4),
                        "model_id": info.model_id if info else None,
                        "fingerprint": info.checkpoint_fingerprint if info else None,
                        "model_version": info.model_version if info else None,
                        "codebook_size": info.codebook_size if info else None,
                        "token_rate_hz": info.token_rate_hz if info else None,
                    }
                )
            out[component] = rows
        out["lm"] = [
            {
                "address": e.address,
                "health": e.health,
                "model_id": e.info.model_id if e.info else None,
                "fingerprint": e.info.checkpoint_fingerprint if e.info else None,
                "model_version": e.info.model_version if e.info else None,
            }
            for e in self.lm
        ]
        return out


def version_problems(registry: VersionRegistry) -> list[str]:
    """Every refusal of the registry: incompatible versions and an unreadable file."""
    problems = [p for vs in registry.versions.values() for v in vs for p in v.problems]
    if registry.file_error:
        problems.append(registry.file_error)
    return problems
