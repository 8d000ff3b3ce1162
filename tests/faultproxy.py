"""A fault-injecting HTTP proxy on loopback, for testing the `openai` teacher against real failures.

It forwards POSTs to an upstream server and, on a deterministic schedule, answers instead with
a 500, a 429 with Retry-After, a stalled connection (longer than the client's timeout), or a
200 whose JSON is cut in half. Every request body it sees is kept, so tests can check what
left the process (PII, API keys).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

FAULTS = ("http_500", "http_429", "stall", "truncated_json")


@dataclass
class ProxyState:
    upstream: str  # e.g. http://127.0.0.1:8080
    fault_rate: float = 0.3
    stall_s: float = 5.0
    retry_after_s: int = 1
    always: str | None = None  # a fault type to answer every request with
    require_key: str | None = None  # answer 401 unless "Authorization: Bearer <key>"
    counts: Counter = field(default_factory=Counter)
    bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_action(self) -> str:
        """Deterministic: of every 10 requests, the first `fault_rate * 10` are faults, cycling."""
        with self.lock:
            n = self.counts["requests"]
            self.counts["requests"] += 1
            if self.always:
                action = self.always
            elif n % 10 < round(self.fault_rate * 10):
                action = FAULTS[self.counts["faults"] % len(FAULTS)]
            else:
                action = "forward"
            if action != "forward":
                self.counts["faults"] += 1
            self.counts[action] += 1
            return action


def _handler(state: ProxyState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _reply(self, status: int, body: bytes, extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 — the teacher's probe of /v1/models: forwarded, never a fault
            if state.require_key and self.headers.get("Authorization") != f"Bearer {state.require_key}":
                self._reply(401, b'{"error": {"message": "invalid api key", "type": "invalid_request_error"}}')
                return
            upstream = httpx.get(state.upstream + self.path, timeout=30, trust_env=False)
            self._reply(upstream.status_code, upstream.content)

        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with state.lock:
                state.bodies.append(body)
                state.headers.append(dict(self.headers))
            if state.require_key and self.headers.get("Authorization") != f"Bearer {state.require_key}":
                self._reply(401, b'{"error": {"message": "invalid api key", "type": "invalid_request_error"}}')
                return
            action = state.next_action()
            if action == "http_500":
                self._reply(500, b'{"error": {"message": "injected failure"}}')
            elif action == "http_429":
                self._reply(429, b'{"error": {"message": "slow down"}}', {"Retry-After": str(state.retry_after_s)})
            elif action == "stall":
                time.sleep(state.stall_s)
                self.close_connection = True
            else:
                upstream = httpx.post(state.upstream + self.path, content=body, timeout=300,
                                      headers={"Content-Type": "application/json"}, trust_env=False)
                payload = upstream.content
                if action == "truncated_json":
                    payload = payload[: len(payload) // 2]
                self._reply(upstream.status_code, payload)

    return Handler


class FaultProxy:
    """`with FaultProxy(upstream) as proxy:` → `proxy.base_url` (ends in /v1), `proxy.state`."""

    def __init__(self, upstream: str, **settings: object):
        self.state = ProxyState(upstream.rstrip("/"), **settings)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
