"""A loopback HTTP server that serves model files in the Hugging Face hub's layout, and records what it is asked.

``GET``/``HEAD /<repo>/resolve/<revision>/<file>`` answers as the hub does for a plain file: the commit
in ``X-Repo-Commit``, the file's SHA-256 as its ETag, its size; a missing file is a 404 with
``X-Error-Code: EntryNotFound``, a missing repository one with ``RepoNotFound``; ``/api/agent-harnesses``
answers with an empty registry, as the hub does for clients that ask. With a token set, a
request without ``Authorization: Bearer <token>`` is refused (401), as a private repository is.
Point ``HF_ENDPOINT`` at ``url`` and huggingface_hub (and so timm) downloads from it.
"""

from __future__ import annotations

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubMirror:
    def __init__(self, token: str | None = None) -> None:
        self.files: dict[tuple[str, str], bytes] = {}
        self.requests: list[dict] = []
        self.token = token
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _answer(self, send_body: bool) -> None:
                mirror.requests.append({"method": self.command, "path": self.path,
                                        "authorization": self.headers.get("Authorization", "")})
                if self.path.split("?")[0] == "/api/agent-harnesses":  # a registry huggingface_hub caches for a day
                    return self._json(200, b'{"standardEnvVars": [], "harnesses": {}}', send_body)
                match = re.match(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<file>.+?)(\?.*)?$", self.path)
                if mirror.token and self.headers.get("Authorization") != f"Bearer {mirror.token}":
                    return self._error(401, "GatedRepo", send_body)
                if not match:
                    return self._error(404, "RepoNotFound", send_body)
                repo, filename = match["repo"], match["file"]
                if not any(r == repo for r, _ in mirror.files):
                    return self._error(404, "RepoNotFound", send_body)
                data = mirror.files.get((repo, filename))
                if data is None:
                    return self._error(404, "EntryNotFound", send_body)
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if send_body:
                    self.wfile.write(data)

            def _error(self, status: int, code: str, send_body: bool) -> None:
                self._json(status, b'{"error": "' + code.encode() + b'"}', send_body, {"X-Error-Code": code})

            def _json(self, status: int, body: bytes, send_body: bool, headers: dict | None = None) -> None:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def do_HEAD(self):
                self._answer(send_body=False)

            def do_GET(self):
                self._answer(send_body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, repo: str, filename: str, data: bytes | Path) -> None:
        self.files[(repo, filename)] = data.read_bytes() if isinstance(data, Path) else data

    def downloads(self) -> list[dict]:
        """The files fetched (GET of a resolve path)."""
        return [r for r in self.requests if r["method"] == "GET" and "/resolve/" in r["path"]]

    def close(self) -> None:
        self.server.shutdown()
