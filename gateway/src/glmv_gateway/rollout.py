"""``glmv rollout``: replace the decoder (or tokenizer) version of a single-host deployment, with the
Docker API (Docker, or podman's Docker-compatible socket).

Steps, each logged:

1. start the new version's container on the stack's network (model directory mounted read-only);
2. wait until its gRPC health check answers SERVING;
3. check its ``ModelInfo`` against the LM and the other component (codebook size, token rate);
4. give it a canary share of new sessions in the gateway's version registry file, and watch it;
5. give it every new session (the old versions drain: their sessions keep them);
6. remove the old versions from the registry (the gateways move their sessions at the next turn),
   wait until their in-flight streams end, stop them with SIGTERM (the services drain) and remove
   their containers.

A failed check in steps 1-5 rolls back: the registry file is restored and the new container removed.
The registry file is replaced atomically (write, then rename), so a gateway never reads half of it;
mount its directory (not the file) into gateway containers so that they see the new file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from glmv_common.logs import kv
from glmv_gateway.clients import SERVICE_NAMES, compatibility_problems
from glmvoice.v1 import common_pb2, decoder_pb2_grpc, lm_pb2_grpc, tokenizer_pb2_grpc

log = logging.getLogger("glmv.rollout")

PORTS = {"tokenizer": 50051, "decoder": 50053}
METRICS_PORTS = {"tokenizer": 9101, "decoder": 9103}
ACTIVE_METRIC = {"tokenizer": "glmv_grpc_active_rpcs", "decoder": "glmv_decoder_active_streams"}
MODEL_MOUNT = {"tokenizer": "/models/tokenizer", "decoder": "/models/decoder"}
STUBS = {
    "tokenizer": tokenizer_pb2_grpc.SpeechTokenizerStub,
    "lm": lm_pb2_grpc.LanguageModelStub,
    "decoder": decoder_pb2_grpc.SpeechDecoderStub,
}
LABEL = "glmvoice.rollout"


class RolloutError(RuntimeError):
    """A step failed; the message says which and why."""


@dataclass
class RolloutPlan:
    component: str
    version: str
    image: str
    model_dir: Path
    registry_file: Path
    network: str
    container_name: str = ""
    lm_addr: str = "lm:50052"
    canary_weight: float = 0.1
    canary_s: float = 10.0
    health_timeout_s: float = 300.0
    settle_s: float = 3.0
    drain_timeout_s: float = 120.0
    stop_timeout_s: float = 60.0
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.component not in PORTS:
            raise RolloutError(f"only the tokenizer and the decoder have versions, not {self.component!r}")
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", self.version):
            raise RolloutError(f"version id {self.version!r}: use letters, digits, '.', '_' or '-'")
        if not 0 < self.canary_weight < 1:
            raise RolloutError(f"canary weight {self.canary_weight} must be between 0 and 1")
        self.container_name = self.container_name or f"glmvoice-{self.component}-{self.version}"

    @property
    def port(self) -> int:
        return PORTS[self.component]

    @property
    def address(self) -> str:
        """The new version's address as the gateways on the network reach it."""
        return f"{self.container_name}:{self.port}"


# --- the registry file ----------------------------------------------------------------------------


def read_registry(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RolloutError(f"versions file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise RolloutError(f"versions file {path}: not a JSON object")
    return data


def write_registry(path: Path, registry: dict[str, Any]) -> None:
    """Replace the file atomically, readable by the gateways (which may run as another user)."""
    fd, tmp = tempfile.mkstemp(prefix=".versions-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(registry, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def shares(entries: list[dict[str, Any]]) -> str:
    return ", ".join(
        f"{e['id']}={e.get('weight', 1.0):g}{' (draining)' if e.get('draining') else ''}" for e in entries
    )


# --- gRPC checks ------------------------------------------------------------------------------------


def health(address: str, component: str, timeout: float = 2.0) -> str:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAMES[component]), timeout=timeout
            )
        except grpc.RpcError as error:
            return f"unreachable ({error.code().name})"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def model_info(address: str, component: str, timeout: float = 10.0) -> common_pb2.ModelInfo:
    with grpc.insecure_channel(address) as channel:
        try:
            return STUBS[component](channel).GetInfo(common_pb2.GetInfoRequest(), timeout=timeout)
        except grpc.RpcError as error:
            raise RolloutError(f"{component} at {address}: GetInfo failed: {error.code().name}") from None


# --- the rollout ------------------------------------------------------------------------------------


class Rollout:
    def __init__(
        self, plan: RolloutPlan, client: Any, *, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.plan = plan
        self.client = client
        self.sleep = sleep
        self.step = 0

    def _log(self, message: str, **fields: object) -> None:
        log.info(
            f"step {self.step}: {message}",
            extra=kv(component=self.plan.component, version=self.plan.version, **fields),
        )

    # -- addresses: names on the stack's network, reached from this host through the container IPs

    def _container_ip(self, container: Any) -> str:
        container.reload()
        networks = container.attrs.get("NetworkSettings", {}).get("Networks", {}) or {}
        net = networks.get(self.plan.network) or next(iter(networks.values()), {})
        ip = net.get("IPAddress", "")
        if not ip:
            raise RolloutError(f"container {container.name} has no address on network {self.plan.network}")
        return ip

    def _find(self, host: str) -> Any | None:
        """The container a network name (container name or network alias) belongs to."""
        for container in self.client.containers.list():
            if container.name == host:
                return container
            networks = container.attrs.get("NetworkSettings", {}).get("Networks", {}) or {}
            aliases = networks.get(self.plan.network, {}).get("Aliases") or []
            service = container.labels.get("com.docker.compose.service")
            if host in aliases or (service == host and self.plan.network in networks):
                return container
        return None

    @staticmethod
    def _host(address: str) -> str:
        return address.removeprefix("dns:///").rpartition(":")[0]

    def reachable(self, address: str) -> str:
        """``address`` as this host reaches it: a container on the network by its IP, else as given."""
        host, _, port = address.removeprefix("dns:///").rpartition(":")
        container = self._find(host)
        return f"{self._container_ip(container)}:{port}" if container is not None else address

    # -- steps

    def start(self) -> Any:
        plan = self.plan
        prefix = f"GLMV_{plan.component.upper()}_"
        env = {
            f"{prefix}HOST": "0.0.0.0",
            f"{prefix}PORT": str(plan.port),
            f"{prefix}MODEL_DIR": MODEL_MOUNT[plan.component],
            f"{prefix}MODEL_VERSION": plan.version,
            **plan.env,
        }
        self._log("starting the new version's container", image=plan.image, name=plan.container_name)
        try:
            container = self.client.containers.run(
                plan.image,
                name=plan.container_name,
                detach=True,
                environment=env,
                network=plan.network,
                volumes={str(plan.model_dir.resolve()): {"bind": MODEL_MOUNT[plan.component], "mode": "ro"}},
                labels={LABEL: plan.component, "glmvoice.version": plan.version},
            )
        except Exception as exc:
            raise RolloutError(f"starting {plan.image} as {plan.container_name} failed: {exc}") from None
        return container

    def wait_serving(self, container: Any, address: str) -> None:
        self._log("waiting for gRPC health SERVING", address=address)
        deadline = time.monotonic() + self.plan.health_timeout_s
        status = "not checked"
        while time.monotonic() < deadline:
            container.reload()
            if container.status in ("exited", "dead"):
                logs = container.logs(tail=20).decode(errors="replace")
                raise RolloutError(f"{container.name} exited before serving:\n{logs}")
            status = health(address, self.plan.component)
            if status == "SERVING":
                self._log("new version is SERVING")
                return
            self.sleep(1.0)
        raise RolloutError(
            f"{container.name} was not SERVING within {self.plan.health_timeout_s:g} s (last: {status})"
        )

    def check_compatible(self, address: str, registry: dict[str, Any]) -> common_pb2.ModelInfo:
        plan = self.plan
        new = model_info(address, plan.component)
        infos = {plan.component: new, "lm": model_info(self.reachable(plan.lm_addr), "lm")}
        other = "decoder" if plan.component == "tokenizer" else "tokenizer"
        entries = [e for e in registry.get(other) or [] if not e.get("draining")]
        other_addr = entries[0]["addresses"][0] if entries else f"{other}:{PORTS[other]}"
        infos[other] = model_info(self.reachable(other_addr), other)
        problems = compatibility_problems(infos)
        reported = getattr(new, "model_version", "") or ""
        if reported and reported != plan.version:
            problems.append(f"it reports model_version {reported!r}, not {plan.version!r}")
        if problems:
            raise RolloutError(f"{plan.component} {plan.version} is incompatible: " + "; ".join(problems))
        self._log(
            "ModelInfo compatible with the LM",
            fingerprint=new.checkpoint_fingerprint[:12],
            codebook=new.codebook_size,
            token_rate_hz=new.token_rate_hz,
        )
        return new

    def _publish(self, registry: dict[str, Any], what: str) -> None:
        write_registry(self.plan.registry_file, registry)
        self._log(what, registry=shares(registry[self.plan.component]))
        self.sleep(self.plan.settle_s)  # the gateways re-read the file (about every second)

    def watch_canary(self, container: Any, address: str) -> None:
        deadline = time.monotonic() + self.plan.canary_s
        while True:
            container.reload()
            if container.status != "running":
                raise RolloutError(f"{container.name} stopped during the canary ({container.status})")
            status = health(address, self.plan.component)
            if status != "SERVING":
                raise RolloutError(f"{container.name} turned {status} during the canary")
            if time.monotonic() >= deadline:
                break
            self.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
        self._log("canary healthy", seconds=self.plan.canary_s)

    def active_streams(self, container: Any) -> float | None:
        """In-flight streams of a running service, read from its metrics endpoint inside its container."""
        port, metric = METRICS_PORTS[self.plan.component], ACTIVE_METRIC[self.plan.component]
        script = (
            "import urllib.request;"
            f"print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=5).read().decode())"
        )
        try:
            code, output = container.exec_run(["python", "-c", script])
        except Exception:
            return None
        if code != 0:
            return None
        total = None
        for line in output.decode(errors="replace").splitlines():
            if line.startswith(metric) and not line.startswith("#"):
                total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
        return total

    def wait_idle(self, containers: list[Any]) -> None:
        """Until no old container streams (or the drain timeout passes)."""
        deadline = time.monotonic() + self.plan.drain_timeout_s
        active: list[float | None] = []
        while time.monotonic() < deadline:
            active = [self.active_streams(c) for c in containers]
            if not any(active):
                return
            self.sleep(0.2)
        self._log("old versions still stream; removing them from the registry anyway", active=active)

    def retire(self, container: Any, version_id: str) -> None:
        """Wait for the old version's streams to end, then SIGTERM (the service drains) and remove it."""
        deadline = time.monotonic() + self.plan.drain_timeout_s
        active = self.active_streams(container)
        while active and time.monotonic() < deadline:
            self.sleep(0.5)
            active = self.active_streams(container)
        self._log("stopping the old version with SIGTERM", old=version_id, name=container.name, active=active)
        # `stop` (not a bare kill): SIGTERM, then SIGKILL after the timeout, and a restart policy such
        # as compose's unless-stopped does not bring the container back.
        try:
            container.stop(timeout=int(self.plan.stop_timeout_s))
        except Exception as exc:
            raise RolloutError(f"stopping {container.name} failed: {exc}") from None
        container.reload()
        self._log("old version stopped", old=version_id, name=container.name, status=container.status)
        try:
            container.remove()
        except Exception as exc:  # e.g. compose made other containers depend on it: compose removes it
            self._log(
                "old container stopped but not removed", old=version_id, name=container.name, why=str(exc)
            )
            return
        self._log("old version removed", old=version_id, name=container.name)

    def run(self) -> None:
        plan = self.plan
        original = read_registry(plan.registry_file)
        entries = original.get(plan.component) or []
        if any(e.get("id") == plan.version for e in entries):
            raise RolloutError(f"version {plan.version} is already in {plan.registry_file}")
        if self._find(plan.container_name) is not None:
            raise RolloutError(f"a container named {plan.container_name} already runs")
        old = [dict(e) for e in entries]
        self.step = 0
        self._log("rollout begins", registry=shares(old) or "(none)", file=str(plan.registry_file))

        container = None
        try:
            self.step = 1
            container = self.start()
            self.step = 2
            address = f"{self._container_ip(container)}:{plan.port}"
            self.wait_serving(container, address)
            self.step = 3
            self.check_compatible(address, original)
            self.step = 4
            live = [e for e in old if not e.get("draining")]
            total = sum(float(e.get("weight", 1.0)) for e in live) or 1.0
            canary = json.loads(json.dumps(original))
            canary[plan.component] = [
                {**e, "weight": float(e.get("weight", 1.0)) / total * (1 - plan.canary_weight)}
                if not e.get("draining")
                else e
                for e in old
            ] + [
                {
                    "id": plan.version,
                    "addresses": [plan.address],
                    "weight": plan.canary_weight,
                    "draining": False,
                }
            ]
            self._publish(canary, f"canary: {plan.canary_weight:.0%} of new sessions to the new version")
            self.watch_canary(container, address)
            self.step = 5
            shifted = json.loads(json.dumps(canary))
            shifted[plan.component] = [
                {**e, "weight": 0.0, "draining": True} if e["id"] != plan.version else {**e, "weight": 1.0}
                for e in canary[plan.component]
            ]
            self._publish(shifted, "all new sessions to the new version; the old ones drain")
            container.reload()
            if container.status != "running" or health(address, plan.component) != "SERVING":
                raise RolloutError(f"{container.name} failed right after taking all traffic")
        except BaseException as exc:
            self._log("FAILED; rolling back", error=str(exc))
            write_registry(plan.registry_file, original)
            self._log("registry restored", registry=shares(old) or "(none)")
            if container is not None:
                try:
                    container.remove(force=True)
                    self._log("new container removed", name=plan.container_name)
                except Exception as rm_exc:  # keep the original error
                    self._log("could not remove the new container", error=str(rm_exc))
            if isinstance(exc, RolloutError):
                raise
            raise RolloutError(f"step {self.step}: {exc}") from exc

        self.step = 6
        # Remove the old versions at a moment when none streams (bounded): the gateways close a removed
        # version's channel after a short grace, which a long in-flight stream would outlast.
        olds = [c for e in old for c in (self._find(self._host(a)) for a in e.get("addresses", [])) if c]
        self.wait_idle(olds)
        final = json.loads(json.dumps(shifted))
        final[plan.component] = [e for e in shifted[plan.component] if e["id"] == plan.version]
        self._publish(final, "old versions removed from the registry; their sessions move at the next turn")
        for entry in old:
            for address in entry.get("addresses", []):
                old_container = self._find(self._host(address))
                if old_container is None:
                    self._log("no container found for an old version; stop it yourself", old=entry["id"])
                    continue
                self.retire(old_container, entry["id"])
        self._log("rollout complete", registry=shares(final[plan.component]))
