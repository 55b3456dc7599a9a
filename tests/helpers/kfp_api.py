"""A loopback HTTP server that answers like the KFP v2beta1 API and records what it receives."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class KfpApiRecorder:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, body: dict, status: int = 200) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                entry = {"method": self.command, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                         "body": json.loads(raw) if raw else None}
                recorder.requests.append(entry)
                return entry

            def do_GET(self):
                entry = self._record()
                path = entry["path"].split("?")[0]
                if path.endswith("/healthz"):
                    self._reply({"multi_user": False})
                elif path == "/apis/v2beta1/experiments":
                    self._reply({"experiments": [], "total_size": 0})
                elif path.startswith("/apis/v2beta1/runs/"):
                    self._reply({"run_id": path.rsplit("/", 1)[1], "display_name": "r", "state": "SUCCEEDED"})
                else:
                    self._reply({"error": "not found"}, 404)

            def do_POST(self):
                entry = self._record()
                path = entry["path"].split("?")[0]
                if path == "/apis/v2beta1/experiments":
                    self._reply({"experiment_id": "exp-1", "display_name": entry["body"]["display_name"]})
                elif path == "/apis/v2beta1/runs":
                    self._reply({**entry["body"], "run_id": "run-1", "state": "PENDING"})
                elif path == "/apis/v2beta1/recurringruns":
                    self._reply({**entry["body"], "recurring_run_id": "rr-1"})
                else:
                    self._reply({"error": "not found"}, 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def posted(self, path: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == "POST" and r["path"].split("?")[0] == path]

    def close(self) -> None:
        self.server.shutdown()
