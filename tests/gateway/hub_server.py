"""A local HTTP server with the Hugging Face hub's file layout, written from the hub's HTTP API.

Serves the repositories under a directory (``<root>/<org>/<name>/<files>``) at one fixed commit:
``GET /api/models/<repo>/revision/<rev>`` (repository info), ``GET /api/models/<repo>/tree/<rev>``
(the file listing), and ``HEAD``/``GET /<repo>/resolve/<rev>/<path>`` (file metadata and bytes, with
``Range`` support). Every request is recorded, and a file can be made to break off part-way.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".pt", ".bin", ".model")


@dataclass
class Request:
    method: str
    path: str
    range: str | None


@dataclass
class HubState:
    root: Path
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    requests: list[Request] = field(default_factory=list)
    # path-in-repo -> byte offset at which every GET of that file breaks off (until removed)
    break_at: dict[str, int] = field(default_factory=dict)
    # path-in-repo -> how many more GETs of that file break off at break_at_once's offset
    break_once: dict[str, tuple[int, int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def files(self, repo: str) -> list[Path]:
        base = self.root / repo
        return sorted(p for p in base.rglob("*") if p.is_file())

    def gets(self, name: str) -> list[Request]:
        return [
            r
            for r in self.requests
            if r.method == "GET" and r.path.endswith(f"/resolve/{self.commit}/{name}")
        ]


def _is_lfs(path: Path) -> bool:
    return path.suffix in LFS_SUFFIXES


def _entry(base: Path, path: Path) -> dict:
    data = path.read_bytes()
    entry = {
        "type": "file",
        "path": path.relative_to(base).as_posix(),
        "size": len(data),
        "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
    }
    if _is_lfs(path):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry


class _Handler(BaseHTTPRequestHandler):
    state: HubState
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _json(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _not_found(self, code: str) -> None:
        self._json(404, {"error": code}, {"X-Error-Code": code, "X-Error-Message": code})

    def do_HEAD(self) -> None:
        self._handle()

    def do_GET(self) -> None:
        self._handle()

    def _handle(self) -> None:
        st = self.state
        path = unquote(urlsplit(self.path).path)
        with st.lock:
            st.requests.append(Request(self.command, path, self.headers.get("Range")))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path):
            repo = m.group(1)
            if not (st.root / repo).is_dir():
                return self._not_found("RepoNotFound")
            base = st.root / repo
            return self._json(
                200,
                {
                    "_id": repo,
                    "id": repo,
                    "modelId": repo,
                    "sha": st.commit,
                    "private": False,
                    "disabled": False,
                    "gated": False,
                    "tags": [],
                    "siblings": [{"rfilename": p.relative_to(base).as_posix()} for p in st.files(repo)],
                },
            )
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
            repo = m.group(1)
            if not (st.root / repo).is_dir():
                return self._not_found("RepoNotFound")
            base = st.root / repo
            return self._json(200, [_entry(base, p) for p in st.files(repo)])
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            repo, name = m.group(1), m.group(3)
            file = st.root / repo / name
            if not file.is_file():
                return self._not_found("EntryNotFound")
            return self._send_file(file, name)
        return self._not_found("NotFound")

    def _send_file(self, file: Path, name: str) -> None:
        st = self.state
        data = file.read_bytes()
        etag = hashlib.sha256(data).hexdigest() if _is_lfs(file) else _entry(file.parent, file)["oid"]
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", (self.headers.get("Range") or "").strip())
        if m:
            start = int(m.group(1))
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{etag}"')
        self.send_header("X-Repo-Commit", st.commit)
        if _is_lfs(file):
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if self.command == "HEAD":
            return
        cut = None
        with st.lock:
            if name in st.break_at:
                cut = st.break_at[name]
            elif name in st.break_once:
                offset, left = st.break_once[name]
                cut = offset
                if left <= 1:
                    del st.break_once[name]
                else:
                    st.break_once[name] = (offset, left - 1)
        if cut is not None and cut < len(data):
            # send up to the break offset, then drop the connection mid-body
            self.wfile.write(data[start : max(cut, start)])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


class HubServer:
    """``with HubServer(root) as hub: hub.url`` — serves ``root`` until the block ends."""

    def __init__(self, root: Path) -> None:
        self.state = HubState(root=root)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
