"""Local stack without Docker: Redis (if none answers), the three model services and the gateway as
processes on dev (or given) checkpoints; waits for readiness; stops everything cleanly.

With ``supervise=True`` (what ``glmv stack up`` uses) a thread restarts any process that exits, on
the same ports, after a backoff that doubles for each quick crash (0.5 s up to 30 s, reset once it
has run for a minute), like compose's ``restart: unless-stopped``; the rest keeps serving and the
gateway's /readyz answers 503 until the restarted service is SERVING again. Every child gets this
process's pid in ``GLMV_PARENT_PID`` and stops by itself if the stack dies (even by SIGKILL).

The gateway package itself has no torch: it only launches the services' console scripts.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

COMPONENTS = ("tokenizer", "lm", "decoder")
DEV_API_KEY = "dev-key"
PARENT_ENV = "GLMV_PARENT_PID"
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0


class StackError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def redis_answers(host: str = "127.0.0.1", port: int = 6379) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def script(name: str) -> str:
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise StackError(f"{name} is not installed (run scripts/setup-dev.sh)")
    return found


def make_dev_models(root: Path, *, seed: int = 0, force: bool = False) -> dict[str, Path]:
    """Write the tiny random dev checkpoints (once) under ``root/<component>``."""
    dirs = {c: root / c for c in COMPONENTS}
    markers = {"tokenizer": "model.safetensors", "lm": "config.json", "decoder": "flow.pt"}
    for component, path in dirs.items():
        if not force and (path / markers[component]).exists():
            continue
        cmd = [script(f"glmv-{component}"), "make-dev", "--out", str(path), "--seed", str(seed)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise StackError(f"making the {component} dev checkpoint failed:\n{result.stderr[-2000:]}")
    return dirs


@dataclass
class LocalStack:
    models: dict[str, Path]
    redis_url: str = "redis://127.0.0.1:6379/0"
    api_key: str = DEV_API_KEY
    ports: dict[str, int] = field(default_factory=dict)
    log_dir: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    gateway_env: dict[str, str] = field(default_factory=dict)
    with_worker: bool = True
    jobs_dir: Path = Path(".run/jobs")
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _redis_proc: subprocess.Popen[bytes] | None = None
    _redis_watch: subprocess.Popen[bytes] | None = None
    gateway_env_resolved: dict[str, str] = field(default_factory=dict)
    stopped: set[str] = field(default_factory=set)  # processes killed on purpose (not a failure)
    supervise: bool = False
    # where the gateway reaches a service, when not directly (e.g. through a proxy in a fault test)
    gateway_addrs: dict[str, str] = field(default_factory=dict)
    restarts: list[dict[str, object]] = field(default_factory=list)
    _commands: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)
    _started_at: dict[str, float] = field(default_factory=dict)
    _failures: dict[str, int] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _supervisor: threading.Thread | None = None

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    def metrics_url(self, component: str) -> str:
        if component == "gateway":
            return f"{self.gateway_url}/metrics"
        return f"http://127.0.0.1:{self.ports[f'{component}_metrics']}/metrics"

    def addr(self, component: str) -> str:
        return f"127.0.0.1:{self.ports[component]}"

    def _ensure_redis(self) -> None:
        host_port = self.redis_url.split("//", 1)[1].split("/", 1)[0]
        host, _, port = host_port.rpartition(":")
        if redis_answers(host or "127.0.0.1", int(port or 6379)):
            return
        binary = shutil.which("redis-server")
        if not binary:
            raise StackError(
                f"no Redis answers at {self.redis_url} and redis-server is not installed "
                "(scripts/ensure-redis.sh installs and starts one)"
            )
        self._redis_proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", port or "6379", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # redis-server cannot notice by itself that the stack died: a sidecar stops it then
        self._redis_watch = subprocess.Popen(
            [sys.executable, "-m", "glmv_common.parent", "--watch", str(self._redis_proc.pid)],
            env={**os.environ, PARENT_ENV: str(os.getpid())},
        )
        deadline = time.monotonic() + 10
        while not redis_answers(host or "127.0.0.1", int(port or 6379)):
            if time.monotonic() > deadline:
                raise StackError("redis-server did not start")
            time.sleep(0.1)

    @property
    def broker_url(self) -> str:
        """The Celery broker: the sessions' Redis server, the next database number."""
        base, _, db = self.redis_url.rpartition("/")
        return f"{base}/{(int(db) + 1) % 16 if db.isdigit() else 1}"

    def _env(self, component: str) -> dict[str, str]:
        prefix = f"GLMV_{component.upper()}_"
        env = {**os.environ, **self.extra_env}
        env.update(
            {
                f"{prefix}HOST": "127.0.0.1",
                f"{prefix}PORT": str(self.ports[component]),
                f"{prefix}MODEL_DIR": str(self.models[component]),
                f"{prefix}METRICS_PORT": str(self.ports[f"{component}_metrics"]),
                f"{prefix}LOG_FORMAT": env.get(f"{prefix}LOG_FORMAT", "text"),
                # three model processes share the host's cores instead of each taking all of them
                f"{prefix}TORCH_THREADS": env.get(
                    f"{prefix}TORCH_THREADS", str(max(1, (os.cpu_count() or 1) // 3))
                ),
            }
        )
        return env

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        out = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
        env = {**env, PARENT_ENV: str(os.getpid())}
        with self._lock:
            self._commands[name] = (cmd, env)
            self.procs[name] = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
            self._started_at[name] = time.monotonic()
            self.stopped.discard(name)
        if out is not subprocess.DEVNULL:
            out.close()  # the child holds its own copy

    # --- supervision ------------------------------------------------------------------------------

    def _say(self, message: str) -> None:
        print(f"glmv stack: {message}", file=sys.stderr, flush=True)
        if self.log_dir is not None:
            with open(self.log_dir / "supervisor.log", "a") as log:
                log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")

    def start_supervisor(self) -> None:
        if self._supervisor is None:
            self._supervisor = threading.Thread(target=self._supervise, name="stack-supervisor", daemon=True)
            self._supervisor.start()

    def _supervise(self) -> None:
        pending: dict[str, float] = {}  # name -> monotonic time of its restart
        while not self._stopping.wait(0.1):
            now = time.monotonic()
            with self._lock:
                for name, proc in list(self.procs.items()):
                    if proc.poll() is None or name in pending:
                        continue
                    uptime = now - self._started_at.get(name, now)
                    failures = 1 if uptime >= STABLE_AFTER_S else self._failures.get(name, 0) + 1
                    self._failures[name] = failures
                    delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (failures - 1))
                    code = proc.returncode
                    how = f"signal {-code}" if code < 0 else f"code {code}"
                    self._say(
                        f"{name} (pid {proc.pid}) exited with {how} after {uptime:.1f} s; "
                        f"restarting in {delay:.1f} s (restart #{failures} in a row)"
                    )
                    self.restarts.append(
                        {"name": name, "pid": proc.pid, "returncode": code, "delay_s": delay}
                    )
                    pending[name] = now + delay
                for name, at in list(pending.items()):
                    if now < at or self._stopping.is_set():
                        continue
                    del pending[name]
                    cmd, env = self._commands[name]
                    self._spawn(name, cmd, env)
                    self._say(f"{name} restarted (pid {self.procs[name].pid})")

    def start_service(self, component: str) -> None:
        self._spawn(component, [script(f"glmv-{component}"), "serve"], self._env(component))

    def reserve_ports(self) -> None:
        for name in (*COMPONENTS, *(f"{c}_metrics" for c in COMPONENTS), "gateway", "audiosocket"):
            self.ports.setdefault(name, free_port())

    def start_extra(
        self, name: str, component: str, model_dir: Path, env: dict[str, str] | None = None
    ) -> str:
        """Another instance of a model service (a second decoder version, an LM replica) under
        ``name`` with its own ports; returns its address. May run before or after :meth:`start`."""
        self.reserve_ports()
        self.ports.setdefault(name, free_port())
        self.ports.setdefault(f"{name}_metrics", free_port())
        prefix = f"GLMV_{component.upper()}_"
        service_env = self._env(component)
        service_env.update(
            {
                f"{prefix}PORT": str(self.ports[name]),
                f"{prefix}METRICS_PORT": str(self.ports[f"{name}_metrics"]),
                f"{prefix}MODEL_DIR": str(model_dir),
                **(env or {}),
            }
        )
        self._spawn(name, [script(f"glmv-{component}"), "serve"], service_env)
        return self.addr(name)

    def restart_gateway(self, timeout: float = 120.0) -> None:
        """Stop the gateway (SIGTERM) and start it again with the same settings."""
        self.kill("gateway", signal.SIGTERM)
        self._spawn("gateway", [script("glmv"), "gateway"], self.gateway_env_resolved)
        self.wait_ready(timeout)

    def start(self, timeout: float = 180.0) -> LocalStack:
        self.reserve_ports()
        self._ensure_redis()
        for component in COMPONENTS:
            self.start_service(component)
        env = {**os.environ, **self.extra_env, **self.gateway_env}
        env.update(
            {
                "GLMV_GATEWAY_HOST": "127.0.0.1",
                "GLMV_GATEWAY_PORT": str(self.ports["gateway"]),
                "GLMV_GATEWAY_AUDIOSOCKET_PORT": str(self.ports["audiosocket"]),
                "GLMV_GATEWAY_REDIS_URL": self.redis_url,
                **{
                    f"GLMV_GATEWAY_{c.upper()}_ADDR": self.gateway_addrs.get(c, self.addr(c))
                    for c in COMPONENTS
                },
                "GLMV_GATEWAY_API_KEYS": ",".join(
                    filter(None, [env.get("GLMV_GATEWAY_API_KEYS"), self.api_key])
                ),
                "GLMV_GATEWAY_LOG_FORMAT": env.get("GLMV_GATEWAY_LOG_FORMAT", "text"),
                "GLMV_GATEWAY_BROKER_URL": env.get("GLMV_GATEWAY_BROKER_URL", self.broker_url),
                "GLMV_GATEWAY_JOBS_DIR": env.get("GLMV_GATEWAY_JOBS_DIR", str(self.jobs_dir)),
                # the browser talk page is on in the local stack, its secrets minted for the stack's key
                "GLMV_GATEWAY_DEMO_PAGE": env.get("GLMV_GATEWAY_DEMO_PAGE", "true"),
                "GLMV_GATEWAY_DEMO_API_KEY": env.get("GLMV_GATEWAY_DEMO_API_KEY", self.api_key),
            }
        )
        self.gateway_env_resolved = env
        self._spawn("gateway", [script("glmv"), "gateway"], env)
        if self.with_worker:
            self.start_worker()
        if self.supervise:  # from the start: a process that dies while the stack comes up is restarted
            self.start_supervisor()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def start_worker(self, name: str = "worker") -> None:
        """A Celery batch worker with the gateway's settings (several may run: worker, worker2, ...)."""
        self._spawn(name, [script("glmv"), "worker"], self.gateway_env_resolved)

    def wait_ready(self, timeout: float = 180.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        last: object = "gateway not answering"
        while time.monotonic() < deadline:
            for name, proc in list(self.procs.items()):
                if proc.poll() is not None and name not in self.stopped and self._supervisor is None:
                    raise StackError(f"{name} exited with code {proc.returncode}{self._log_hint(name)}")
            try:
                response = httpx.get(f"{self.gateway_url}/readyz", timeout=5)
                if response.status_code == 200:
                    return response.json()
                last = response.json()
            except httpx.HTTPError as exc:
                last = exc
            time.sleep(0.25)
        raise StackError(f"stack not ready after {timeout:.0f} s: {last}")

    def _log_hint(self, name: str) -> str:
        if self.log_dir is None:
            return ""
        path = self.log_dir / f"{name}.log"
        tail = path.read_text(errors="replace")[-1500:] if path.exists() else ""
        return f" (log {path}):\n{tail}"

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        proc.send_signal(sig)
        proc.wait(timeout=30)
        self.stopped.add(name)

    def stop(self, timeout: float = 20.0) -> None:
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
            self._supervisor = None
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._redis_proc is not None:
            self._redis_proc.terminate()
            self._redis_proc.wait(timeout=10)
            self._redis_proc = None
        if self._redis_watch is not None:
            self._redis_watch.terminate()
            self._redis_watch.wait(timeout=10)
            self._redis_watch = None

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
