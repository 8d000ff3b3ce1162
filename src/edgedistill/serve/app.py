"""The private OpenAI-compatible server: FastAPI in front of llama.cpp's own server (or the
transformers engine, serve/hf_engine.py).

Why a front at all, when llama.cpp already speaks OpenAI: it is what makes the server safe to
leave running — an API key whenever it listens beyond loopback, request limits answered with
OpenAI-style 400s (never a stack trace), a bounded queue that sheds overload with 503 +
Retry-After instead of piling up, no prompt or completion text in the logs, Prometheus
metrics, the run's name as the model id, and a chat page for people who do not use curl.
Generation itself (chat template, sampling, stop strings, logprobs, SSE streaming) is
llama.cpp's: the front forwards bodies and streams, and closing a client's stream closes the
upstream request, which frees the slot. The exception is the legacy `/v1/completions` on
llama.cpp, which the front assembles (echo, prompt log-probabilities, batches of prompts;
serve/llamacpp_completions.py).

The engine listens on a random loopback port with a random key of its own, known only to the
front (issue #20: without it any local user could reach the engine past the front's key and
limits).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgedistill.serve.llamacpp_completions import (
    LlamaCppCompletions,
    UpstreamError,
    legacy_chunk,
)
from edgedistill.serve.policy import Policy, with_system_prompt
from edgedistill.serve.wire import RequestError, check_request, openai_error

log = logging.getLogger("edgedistill.serve")


@dataclass
class ServeSettings:
    model_id: str
    upstream: str  # the engine's server, e.g. http://127.0.0.1:PORT
    api_key: str | None = None
    engine: str = "llamacpp"  # or "transformers"
    upstream_key: str | None = None  # the engine's own key, sent as a bearer token
    max_body_bytes: int = 1 << 20
    max_tokens_cap: int = 2048
    parallel: int = 2  # requests generating at once (llama.cpp slots)
    queue_size: int = 16  # requests waiting beyond those; more → 503
    log_content: bool = False
    policy: Policy | None = None  # --policy: system prompt for chat requests, usage policy at /policy


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("edgedistill_requests", "Requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.tokens = Counter("edgedistill_tokens", "Tokens by kind", ["kind"], registry=self.registry)
        self.latency = Histogram("edgedistill_request_seconds", "Request latency", ["endpoint"],
                                 registry=self.registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.queue_depth = Gauge("edgedistill_queue_depth", "Requests waiting for a slot", registry=self.registry)
        self.in_flight = Gauge("edgedistill_in_flight", "Requests generating", registry=self.registry)
        self.echo_positions = Counter("edgedistill_echo_positions", "Prompt positions scored for echo on llama.cpp, "
                                      "by source (engine, cache; fallback: read from a list)", ["source"],
                                      registry=self.registry)


class Admission:
    """`parallel` requests generate, `queue_size` wait; anything beyond is refused at once."""

    def __init__(self, parallel: int, queue_size: int, metrics: Metrics):
        self.slots = asyncio.Semaphore(parallel)
        self.limit = parallel + queue_size
        self.admitted = 0
        self.metrics = metrics

    def try_enter(self) -> bool:
        if self.admitted >= self.limit:
            return False
        self.admitted += 1
        return True

    async def acquire(self) -> None:
        self.metrics.queue_depth.inc()
        try:
            await self.slots.acquire()
        finally:
            self.metrics.queue_depth.dec()
        self.metrics.in_flight.inc()

    def release(self, acquired: bool) -> None:
        if acquired:
            self.slots.release()
            self.metrics.in_flight.dec()
        self.admitted -= 1


def _validate(body: dict, settings: ServeSettings, endpoint: str) -> JSONResponse | None:
    model = body.get("model")
    if model not in (None, "", settings.model_id):
        return openai_error(404, f"The model '{model}' does not exist; this server has '{settings.model_id}'.",
                            code="model_not_found", param="model")
    try:
        check_request(body, endpoint, settings.engine, settings.max_tokens_cap)
    except RequestError as exc:
        return openai_error(400, str(exc), param=exc.param)
    return None


def create_app(settings: ServeSettings) -> FastAPI:
    metrics = Metrics()
    admission = Admission(settings.parallel, settings.queue_size, metrics)
    state = {"ready": False}
    headers = {"Authorization": f"Bearer {settings.upstream_key}"} if settings.upstream_key else None
    client = httpx.AsyncClient(base_url=settings.upstream, timeout=httpx.Timeout(600.0, connect=5.0), trust_env=False,
                               headers=headers)
    legacy = None  # the front assembles legacy completions on llama.cpp (serve/llamacpp_completions.py)
    if settings.engine == "llamacpp":
        legacy = LlamaCppCompletions(client, settings.parallel, metrics.echo_positions)

    async def wait_for_model() -> None:
        while not state["ready"]:
            try:
                state["ready"] = (await client.get("/health")).status_code == 200
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.2)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(wait_for_model())  # /health answers 503 until it is done
        yield
        task.cancel()
        await client.aclose()

    app = FastAPI(title="edgedistill", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Unknown routes and wrong methods in the OpenAI error shape, not FastAPI's {"detail"}."""
        if exc.status_code == 405:
            message = f"{request.method} {request.url.path}: method not allowed (this endpoint takes POST)."
        elif exc.status_code == 404:
            message = f"{request.url.path}: no such endpoint on this server."
        else:
            message = str(exc.detail)
        return openai_error(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        open_paths = ("/health", "/") if settings.api_key else None
        if settings.api_key and path not in open_paths:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
                metrics.requests.labels(path, "401").inc()
                return openai_error(401, "Missing or invalid API key (send 'Authorization: Bearer <key>').",
                                    kind="authentication_error", code="invalid_api_key")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_body_bytes:
            metrics.requests.labels(path, "413").inc()
            return openai_error(413, f"Request body above {settings.max_body_bytes} bytes.")
        return await call_next(request)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not state["ready"]:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "model": settings.model_id})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": settings.model_id, "object": "model", "created": 0, "owned_by": "edgedistill"}]})

    @app.get("/policy")
    async def policy() -> JSONResponse:
        if settings.policy is None:
            return openai_error(404, "This server has no usage policy (start it with --policy FILE).")
        return JSONResponse(settings.policy.as_json())

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        page = resources.files("edgedistill.serve").joinpath("chat.html").read_text(encoding="utf-8")
        return HTMLResponse(page.replace("{{MODEL}}", settings.model_id))

    async def _body(request: Request) -> dict | JSONResponse:
        raw = await request.body()
        if len(raw) > settings.max_body_bytes:
            return openai_error(413, f"Request body above {settings.max_body_bytes} bytes.")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return openai_error(400, "The body is not valid JSON.")
        if not isinstance(body, dict):
            return openai_error(400, "The body must be a JSON object.")
        return body

    async def _forward(request: Request, endpoint: str) -> Response:
        started = time.perf_counter()
        request_id = uuid.uuid4().hex[:12]
        body = await _body(request)
        if isinstance(body, JSONResponse):
            metrics.requests.labels(endpoint, str(body.status_code)).inc()
            return body
        if (error := _validate(body, settings, endpoint)) is not None:
            metrics.requests.labels(endpoint, str(error.status_code)).inc()
            return error
        if not state["ready"]:
            return openai_error(503, "The model is still loading.", kind="server_error", headers={"Retry-After": "2"})
        if not admission.try_enter():
            metrics.requests.labels(endpoint, "503").inc()
            return openai_error(503, "The server is at capacity; retry shortly.", kind="server_error",
                                code="overloaded", headers={"Retry-After": "1"})
        body["model"] = settings.model_id
        if endpoint == "chat/completions":
            body = with_system_prompt(body, settings.policy)
        if settings.log_content:
            log.info("%s %s content=%s", request_id, endpoint, json.dumps(body, ensure_ascii=False)[:2000])
        if body.get("stream"):
            return StreamingResponse(_stream(endpoint, body, request_id, started), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": request_id})
        acquired = False
        try:
            await admission.acquire()
            acquired = True
            if legacy is not None and endpoint == "completions":
                return _answer(endpoint, await legacy.complete(body, settings.model_id), request_id, started)
            upstream = await client.post(f"/v1/{endpoint}", json=body)
        except UpstreamError as exc:
            metrics.requests.labels(endpoint, str(exc.status)).inc()
            return openai_error(exc.status, str(exc), kind="server_error" if exc.status >= 500 else "invalid_request_error")
        except httpx.HTTPError as exc:
            metrics.requests.labels(endpoint, "502").inc()
            log.warning("%s %s upstream error %s", request_id, endpoint, type(exc).__name__)
            return openai_error(502, "The model runtime did not answer.", kind="server_error")
        finally:
            admission.release(acquired)
        return _relay(endpoint, upstream, request_id, started)

    def _relay(endpoint: str, upstream: httpx.Response, request_id: str, started: float) -> Response:
        try:
            data = upstream.json()
        except json.JSONDecodeError:
            metrics.requests.labels(endpoint, "502").inc()
            return openai_error(502, "The model runtime sent a broken answer.", kind="server_error")
        if upstream.status_code >= 400:  # llama.cpp's own validation, e.g. the prompt is too long
            error = data.get("error") if isinstance(data, dict) else None
            message = error.get("message", "Request rejected.") if isinstance(error, dict) else "Request rejected."
            status = 400 if upstream.status_code < 500 else 502
            metrics.requests.labels(endpoint, str(status)).inc()
            return openai_error(status, message, param=error.get("param") if isinstance(error, dict) else None)
        return _answer(endpoint, data, request_id, started)

    def _answer(endpoint: str, data: dict, request_id: str, started: float) -> Response:
        data["model"] = settings.model_id
        data.pop("timings", None)
        usage = data.get("usage") or {}
        _count(endpoint, usage, "200", started)
        log.info("%s %s prompt_tokens=%s completion_tokens=%s", request_id, endpoint,
                 usage.get("prompt_tokens"), usage.get("completion_tokens"))
        return JSONResponse(data)

    def _count(endpoint: str, usage: dict, status: str, started: float) -> None:
        metrics.requests.labels(endpoint, status).inc()
        metrics.tokens.labels("prompt").inc(usage.get("prompt_tokens") or 0)
        metrics.tokens.labels("completion").inc(usage.get("completion_tokens") or 0)
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    async def _stream(endpoint: str, body: dict, request_id: str, started: float) -> AsyncIterator[bytes]:
        acquired = False
        usage: dict = {}
        status = "200"
        # llama.cpp streams completions with the chat layout of logprobs: turned into the legacy one
        legacy_k = body.get("logprobs") if legacy is not None and endpoint == "completions" else None
        offsets: dict[int, int] = {}
        try:
            await admission.acquire()
            acquired = True
            async with client.stream("POST", f"/v1/{endpoint}", json=body) as upstream:
                if upstream.status_code >= 400:
                    raw = await upstream.aread()
                    try:
                        message = json.loads(raw).get("error", {}).get("message", "Request rejected.")
                    except (json.JSONDecodeError, AttributeError):
                        message = "Request rejected."
                    status = "400"
                    yield f"data: {json.dumps({'error': {'message': message, 'type': 'invalid_request_error'}})}\n\n".encode()
                    return
                async for line in upstream.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    payload = line[6:]
                    if payload.strip() != "[DONE]":
                        try:
                            chunk = json.loads(payload)
                            chunk["model"] = settings.model_id
                            chunk.pop("timings", None)
                            if legacy_k is not None:
                                chunk = legacy_chunk(chunk, legacy_k, offsets)
                            usage = chunk.get("usage") or usage
                            payload = json.dumps(chunk, ensure_ascii=False)
                        except json.JSONDecodeError:
                            continue
                    yield f"data: {payload}\n\n".encode()
        except httpx.HTTPError as exc:
            status = "502"
            log.warning("%s %s upstream error %s", request_id, endpoint, type(exc).__name__)
            yield b'data: {"error": {"message": "The model runtime did not answer.", "type": "server_error"}}\n\n'
        finally:  # also when the client went away: the upstream stream is closed, the slot freed
            admission.release(acquired)
            _count(endpoint, usage, status, started)
            log.info("%s %s stream prompt_tokens=%s completion_tokens=%s", request_id, endpoint,
                     usage.get("prompt_tokens"), usage.get("completion_tokens"))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _forward(request, "chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _forward(request, "completions")

    return app
