"""The scorer as an HTTP service: plain (``POST /score`` with the audio's bytes) and KServe's V1 protocol.

- ``GET /healthz``: 200 once the model is loaded (503 before): readiness and liveness;
- ``POST /score``: the body is one recording's bytes -> ``{"<label>": value, ..., "duration_s", "n_chunks",
  "truncated", "reason"}``;
- ``GET /v1/models/<name>``, ``POST /v1/models/<name>:predict`` with ``{"instances": [{"b64": "<audio>"}]}``
  -> ``{"predictions": [{...}]}``; ``GET /`` answers ``{"status": "alive"}`` as KServe's servers do.

Audio that does not decode is a 422 with a JSON reason, a malformed request a 400. A body whose declared
``Content-Length`` is over the limit is answered 413 before a byte of it is read; a body without one
is refused (411). Recordings are scored by ``workers`` worker processes (``coughscore.processes``: each
on one CPU thread, decoding in parallel, a decoder crash costing one request, not the service); other
requests wait their turn. The service reads only what is sent to it: it never fetches a URL.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .folder import MODEL_NAME
from .scorer import Scorer

log = logging.getLogger(__name__)



class ScoringService:
    """What the handlers share: the scorer (in ``workers`` processes, or in this one), the limits, readiness.

    Args:
        processes: score in worker processes (the default for a scorer folder); else in this process's
            threads, at most ``workers`` at once.
    """

    def __init__(self, scorer: Scorer, workers: int = 1, max_body_bytes: int = 50 * 2**20, model_name: str = MODEL_NAME,
                 processes: bool | None = None) -> None:
        self.scorer = scorer
        self.workers = max(1, workers)
        self.slots = threading.BoundedSemaphore(self.workers)
        self.processes = processes if processes is not None else scorer.folder is not None
        self.pool = None
        self.max_body_bytes = max_body_bytes
        self.model_name = model_name
        self.ready = threading.Event()

    def start(self) -> None:
        """Start the worker processes; ``/healthz`` answers 200 from then on."""
        if self.processes:
            from .processes import ProcessPool

            self.pool = ProcessPool(type(self.scorer), self.scorer.folder, self.scorer.program_name, self.workers)
        self.ready.set()

    def close(self) -> None:
        self.ready.clear()
        if self.pool is not None:
            self.pool.close()

    def score(self, data: bytes, name: str) -> tuple[int, dict]:
        if self.pool is not None:
            row = self.pool.score(name, data)
        else:
            with self.slots:
                row = self.scorer.score_source(data, name)
        if row["status"] != "ok":
            return 422, {"error": row["reason"]}
        return 200, {key: row[key] for key in (*self.scorer.label_columns, "duration_s", "n_chunks", "truncated", "reason")}


def make_server(service: ScoringService, host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    """A threaded HTTP server for the service (``serve_forever`` runs it)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "coughreg-scorer"

        def log_message(self, fmt, *args):  # one line per request on the service's log
            log.info("%s %s", self.address_string(), fmt % args)

        def _send(self, status: int, body: dict, close: bool = False) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes | None:
            """The request body, or None when the answer (411, 413, 400) was already sent."""
            length = self.headers.get("Content-Length")
            if length is None:
                self._send(411, {"error": "send the audio with a Content-Length header"}, close=True)
                return None
            try:
                size = int(length)
            except ValueError:
                self._send(400, {"error": f"Content-Length {length!r} is not a number"}, close=True)
                return None
            if size > service.max_body_bytes:  # answered from the header: the body is never read
                self._send(413, {"error": f"the body is {size} bytes, more than the limit of {service.max_body_bytes}"}, close=True)
                return None
            return self.rfile.read(size)

        def do_GET(self):  # noqa: N802 - the http.server interface
            path = self.path.split("?")[0]
            if path == "/healthz":
                ready = service.ready.is_set()
                self._send(200 if ready else 503, {"status": "ok" if ready else "loading", "model": service.model_name})
            elif path == "/":
                self._send(200, {"status": "alive"})
            elif path == "/v1/models":
                self._send(200, {"models": [service.model_name]})
            elif path == f"/v1/models/{service.model_name}":
                self._send(200, {"name": service.model_name, "ready": service.ready.is_set()})
            else:
                self._send(404, {"error": f"no such path: {path}"})

        def do_POST(self):  # noqa: N802 - the http.server interface
            path = self.path.split("?")[0]
            if path not in ("/score", f"/v1/models/{service.model_name}:predict"):
                self._send(404, {"error": f"no such path: {path}"}, close=True)
                return
            if not service.ready.is_set():
                self._send(503, {"error": "the model is still loading"}, close=True)
                return
            body = self._body()
            if body is None:
                return
            if path == "/score":
                if not body:
                    self._send(400, {"error": "the body is empty: send the recording's bytes"})
                    return
                self._send(*service.score(body, "<request body>"))
                return
            self._predict_v1(body)

        def _predict_v1(self, body: bytes) -> None:
            try:
                instances = json.loads(body)["instances"]
                if not isinstance(instances, list) or not instances:
                    raise ValueError("instances must be a non-empty list")
                payloads = []
                for k, instance in enumerate(instances):
                    if not isinstance(instance, dict) or "b64" not in instance:
                        raise ValueError(f"instance {k}: expected {{\"b64\": \"<audio bytes, base64>\"}} (URLs are not fetched)")
                    payloads.append(base64.b64decode(instance["b64"], validate=True))
            except (ValueError, KeyError, TypeError, binascii.Error) as exc:
                self._send(400, {"error": f"not a V1 predict request: {exc}"})
                return
            predictions = []
            for k, payload in enumerate(payloads):
                status, result = service.score(payload, f"instance {k}")
                if status != 200:
                    self._send(status, {"error": result["error"]})
                    return
                predictions.append(result)
            self._send(200, {"predictions": predictions})

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve(scorer: Scorer, host: str, port: int, workers: int, max_body_mb: float) -> None:
    """Run the service until interrupted (SIGINT or SIGTERM, as Kubernetes stops a pod): listening at once,
    ready (``/healthz`` 200) when the worker processes have loaded the scorer."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    service = ScoringService(scorer, workers, int(max_body_mb * 2**20))
    server = make_server(service, host, port)
    log.info("scorer %s on http://%s:%d (%d workers, bodies up to %g MB); loading", scorer.folder, host, server.server_address[1],
             workers, max_body_mb)
    threading.Thread(target=service.start, name="start-workers", daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        server.server_close()
        service.close()
