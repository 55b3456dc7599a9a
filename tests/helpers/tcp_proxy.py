"""A loopback TCP proxy that can cut a connection after N bytes, or fail every connection for N seconds
(an outage: connections reset at once, open ones cut): real network faults for tests."""

from __future__ import annotations

import socket
import struct
import threading
import time


class FaultProxy:
    """Forward 127.0.0.1:<port> to ``upstream``; ``cut_next(n)`` cuts a connection once n more bytes went down.

    Bytes from upstream to the client are counted (``bytes_down``), so a test can tell whether a
    second run downloaded anything. ``outage_after(n, seconds)``: once n more bytes went down, every
    connection fails for ``seconds`` (``refused`` counts those reset on arrival), then all is well again.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._cuts: list[int] = []
        self._armed_sent = 0
        self.bytes_down = 0
        self.requests: list[bool] = []  # one per HTTP request seen: did it carry an Authorization header?
        self.request_heads: list[str] = []  # the request line and headers of each, lower-cased
        self.cuts_done = 0
        self.refused = 0
        self._outage: tuple[int, float] | None = None  # (bytes_down that starts it, its seconds)
        self.down_until = 0.0  # time.monotonic() until which every connection fails
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_next(self, after_bytes: int, connections: int = 1) -> None:
        """Whichever connection carries the byte ``after_bytes`` (counted from now, downstream) is cut."""
        with self._lock:
            self._cuts.extend([after_bytes] * connections)
            self._armed_sent = 0

    def outage_after(self, after_bytes: int, seconds: float) -> None:
        """Once ``after_bytes`` more bytes went down, every connection fails for ``seconds``."""
        with self._lock:
            self._outage = (self.bytes_down + after_bytes, seconds)

    def down(self) -> bool:
        return time.monotonic() < self.down_until

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        if self.down():  # reset at once: what a client sees from a store that is down
            with self._lock:
                self.refused += 1
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=30)
        except OSError:
            client.close()
            return
        threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
        self._pipe(upstream, client, True)

    def _pipe(self, source: socket.socket, target: socket.socket, downstream: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                keep = len(data)
                if not downstream and data[:8].split(b" ")[0] in (b"GET", b"HEAD", b"PUT", b"POST", b"DELETE"):
                    head = data.split(b"\r\n\r\n")[0].lower()
                    with self._lock:
                        self.requests.append(b"\r\nauthorization:" in head)
                        self.request_heads.append(head.decode("latin-1"))
                if downstream:
                    with self._lock:
                        if self._cuts:
                            budget = self._cuts[0] - self._armed_sent
                            if len(data) >= budget:
                                keep = max(0, budget)
                                self._cuts.pop(0)
                                self._armed_sent = 0
                                self.cuts_done += 1
                            else:
                                self._armed_sent += len(data)
                        self.bytes_down += keep
                        if self._outage and self.bytes_down >= self._outage[0]:
                            self.down_until = time.monotonic() + self._outage[1]
                            self._outage = None
                if self.down():
                    break
                target.sendall(data[:keep])
                if keep < len(data):
                    break
        except OSError:
            pass
        finally:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
