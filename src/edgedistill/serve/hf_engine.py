"""The transformers engine: a HF model folder answering the OpenAI subset llama.cpp's server
speaks (chat and plain completions, SSE streaming, `stop`, `seed`, `logprobs`/`top_logprobs`
with token ids and bytes), in a child process behind the same FastAPI front.

Why our own loop and not `transformers serve`: in transformers 5.24 that server drops
`logprobs`/`top_logprobs` (listed as unused fields), and top-k log-probabilities with token
ids are what make this server a teacher for another run's `openai` backend. The loop is a
plain KV-cached decode: one forward per token, the log-softmax of the raw logits reported,
temperature/top-p applied only to the draw. One request computes at a time (two CPU cores
do not gain from interleaving); the front's queue holds the rest.

A reasoning model (its chat template's `<think>` tags or harmony channels, or the tags its
training recorded) answers like llama.cpp's server with `--reasoning-format deepseek`: the trace
in `message.reasoning_content` (streamed as `delta.reasoning_content`), the answer in `content`.

Why a child process, like llama.cpp: the front stays responsive (health, metrics, 503s)
while torch holds the cores, and the engine dies with its parent. It answers only requests
carrying the bearer token the front gave it through the environment (never the command line,
which `ps` shows to every user).

Legacy completions follow OpenAI's `/v1/completions`: a prompt may be token ids or a batch
(one choice per prompt), `echo` returns the prompt's tokens with their log-probabilities from
the same forward pass that starts decoding, and an end-of-turn token that ends the answer gets
its own entry (lm-evaluation-harness drops the last entry as the generated one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from edgedistill.models.reasoning import StreamSplitter, model_style, split_text
from edgedistill.serve.wire import (
    RequestError,
    Scored,
    legacy_logprobs,
    openai_error,
    prompt_list,
    spelled,
)

TEXT_ONLY = -1
SCORE_CHUNK = 256  # prompt positions per log-softmax in echo: (256, V) floats at a time


@dataclass
class DecodeRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no logprobs; 0..20: the chosen token (+ that many alternatives)
    echo: bool = False  # score the prompt's tokens first (legacy completions)


@dataclass
class Step:
    """One generated token: the text it releases (may be empty) and its log-probabilities.
    token_id TEXT_ONLY: text held back until the end, no token of its own."""

    token_id: int
    delta: str
    logprob: float
    top: list[tuple[int, float]]
    end: bool = False  # the end-of-turn token that ended the answer (no text)


@dataclass
class Echo:
    """The prompt's tokens, each with its log-probability given the ones before it (None for
    the first) and the top alternatives at its position."""

    token_ids: list[int]
    logprobs: list[float | None]
    top: list[list[tuple[int, float]]]


@dataclass
class Finish:
    reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might be the start of a stop string (not released yet)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def _draw(logits: torch.Tensor, request: DecodeRequest, generator: torch.Generator) -> int:
    if request.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / request.temperature, dim=-1)
    if request.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < request.top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(-1, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


class Detokenizer:
    """The text of a growing answer without decoding it whole at every token (quadratic on
    long answers): only the tokens since the last settled point are decoded, and the new text
    is the difference against the same window without the newest tokens (the windowed diff of
    TGI and vLLM). Text becomes settled once it does not end inside a UTF-8 character."""

    def __init__(self, tokenizer, keep_special: bool = False):
        self.tokenizer = tokenizer
        self.keep_special = keep_special  # a reasoning model's markers (harmony's are special tokens)
        self.tokens: list[int] = []
        self.settled = ""
        self._prefix = self._read = 0  # window start; end of what is settled

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=not self.keep_special)

    def add(self, token: int) -> None:
        self.tokens.append(token)
        before = self._text(self.tokens[self._prefix:self._read])
        after = self._text(self.tokens[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.settled += after[len(before):]
            self._prefix, self._read = self._read, len(self.tokens)

    def final(self) -> str:
        """Everything, an unfinished character at the end included (as U+FFFD)."""
        before = self._text(self.tokens[self._prefix:self._read])
        return self.settled + self._text(self.tokens[self._prefix:])[len(before):]


def _top(logprobs: torch.Tensor, k: int | None) -> list[tuple[int, float]]:
    if not k:
        return []
    values, ids = logprobs.topk(k)
    return list(zip(ids.tolist(), values.tolist()))


def prompt_scores(logits: torch.Tensor, ids: list[int], k: int | None) -> Echo:
    """logits (T, V) of one forward over `ids`; row t predicts ids[t + 1]. The chosen and the
    top values come from the same log-softmax, so the top-1 is the same float where it is the
    chosen token (lm-evaluation-harness compares them exactly)."""
    logprobs: list[float | None] = [None]
    top: list[list[tuple[int, float]]] = [[]]
    targets = torch.tensor(ids[1:])
    for start in range(0, len(ids) - 1, SCORE_CHUNK):
        rows = torch.log_softmax(logits[start:start + SCORE_CHUNK].float(), dim=-1)[:len(targets) - start]  # (C, V)
        logprobs += rows.gather(-1, targets[start:start + len(rows), None])[:, 0].tolist()
        top += [_top(row, k) for row in rows]
    return Echo(list(ids), logprobs, top)


@torch.inference_mode()
def decode(model, tokenizer, request: DecodeRequest, end_ids: set[int],
           cancelled: threading.Event | None = None, keep_special: bool = False) -> Iterator[Echo | Step | Finish]:
    """Generate token by token; yields the prompt's Echo when asked, Steps, then one Finish.
    Text is released only once it is whole UTF-8 and cannot be the start of a stop string; a
    stop string ends the answer and is not part of it."""
    generator = torch.Generator().manual_seed(request.seed if request.seed is not None else
                                              int.from_bytes(uuid.uuid4().bytes[:6], "little"))
    out = model(input_ids=torch.tensor([request.prompt_ids]), use_cache=True)
    if request.echo:
        yield prompt_scores(out.logits[0], request.prompt_ids, request.top_logprobs)
    cache, logits = out.past_key_values, out.logits[0, -1]
    text = Detokenizer(tokenizer, keep_special)
    released = 0
    reason, stopped_by_string = "length", False
    while len(text.tokens) < request.max_tokens and not (cancelled and cancelled.is_set()):
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        token = _draw(logits, request, generator)
        top = _top(logprobs, request.top_logprobs)
        if token in end_ids:
            reason = "stop"
            yield Step(token, "", float(logprobs[token]), top, end=True)
            break
        text.add(token)
        settled = text.settled
        hit = min((i for i in (settled.find(s, max(0, released - len(s))) for s in request.stop) if i >= 0),
                  default=-1)
        if hit >= 0:
            yield Step(token, settled[released:hit], float(logprobs[token]), top)
            reason, stopped_by_string = "stop", True
            break
        ready = len(settled) - held_back(settled, request.stop)
        yield Step(token, settled[released:ready], float(logprobs[token]), top)
        released = max(released, ready)
        out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[0, -1]
    if not stopped_by_string:
        final = text.final()
        if len(final) > released:  # what was held back as a possible stop string's start
            yield Step(TEXT_ONLY, final[released:], 0.0, [])
    yield Finish(reason, len(request.prompt_ids), len(text.tokens))


class Engine:
    """A loaded model plus the OpenAI wire format around `decode`."""

    def __init__(self, folder: Path, model_id: str, threads: int = 2):
        from edgedistill.models.hf import end_of_turn_ids, load_causal_lm
        from edgedistill.models.vocab import VocabMap

        torch.set_num_threads(threads)
        self.model, self.tokenizer, _ = load_causal_lm(str(folder))
        self.model_id = model_id
        self.end_ids = end_of_turn_ids(self.model, self.tokenizer)
        self.id_bytes = VocabMap(self.tokenizer).id_bytes
        self.context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        # A reasoning model's trace goes to `reasoning_content`, as llama.cpp's server does it.
        self.style = model_style(folder, self.tokenizer)
        self.lock = threading.Lock()

    # ---- requests -> DecodeRequest ---------------------------------------------------------
    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt)["input_ids"]
        if max(prompt) >= self.vocab_size:  # token ids are used as they are: no BOS added
            raise RequestError(f"Token id {max(prompt)} is outside this model's vocabulary "
                               f"(0-{self.vocab_size - 1}).", "prompt")
        return prompt

    def requests(self, body: dict, chat: bool) -> list[DecodeRequest]:
        """One DecodeRequest per prompt (chat: one). Raises ValueError with a client-facing
        message for what the engine cannot do."""
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise RequestError("'messages' must be a non-empty list.", "messages")
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompts = [self.tokenizer(text, add_special_tokens=False)["input_ids"]]
            top = body.get("top_logprobs", 0) if body.get("logprobs") else None
        else:
            prompts = [self._prompt_ids(p) for p in prompt_list(body.get("prompt"))]
            top = body.get("logprobs")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else [s for s in stop if isinstance(s, str) and s]
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        out = []
        for ids in prompts:
            if len(ids) >= self.context:
                raise RequestError(f"The prompt is {len(ids)} tokens; this model's context is {self.context}.",
                                   "prompt")
            out.append(DecodeRequest(
                prompt_ids=ids, max_tokens=min(256 if max_tokens is None else int(max_tokens), self.context - len(ids)),
                temperature=1.0 if body.get("temperature") is None else float(body["temperature"]),
                top_p=1.0 if body.get("top_p") is None else float(body["top_p"]), seed=body.get("seed"), stop=stop,
                top_logprobs=None if top is None or top is False else int(top), echo=bool(body.get("echo"))))
        return out

    def run(self, request: DecodeRequest, cancelled: threading.Event | None = None) -> Iterator[Echo | Step | Finish]:
        with self.lock:
            yield from decode(self.model, self.tokenizer, request, self.end_ids, cancelled, self.style is not None)

    # ---- wire format ---------------------------------------------------------------------
    def _entry(self, token_id: int, logprob: float) -> dict:
        raw = self.id_bytes.get(token_id, b"")
        return {"id": token_id, "token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

    def chat_logprobs(self, step: Step) -> dict:
        entry = self._entry(step.token_id, step.logprob)
        entry["top_logprobs"] = [self._entry(i, lp) for i, lp in step.top]
        return entry

    def scored(self, token_id: int, logprob: float | None, top: list[tuple[int, float]]) -> Scored:
        return Scored(self.id_bytes.get(token_id, b""), logprob, [(self.id_bytes.get(i, b""), lp) for i, lp in top])

    def echoed(self, echo: Echo) -> list[Scored]:
        return [self.scored(*entry) for entry in zip(echo.token_ids, echo.logprobs, echo.top)]

    def legacy_choice(self, index: int, items: list, request: DecodeRequest) -> tuple[dict, int]:
        """A legacy completion choice and its number of generated tokens (an end token counts)."""
        echo = next((i for i in items if isinstance(i, Echo)), None)
        steps = [i for i in items if isinstance(i, Step)]
        echoed = self.echoed(echo) if echo else []
        generated = [self.scored(s.token_id, s.logprob, s.top) for s in steps if s.token_id != TEXT_ONLY]
        finish = next(i for i in items if isinstance(i, Finish))
        k = request.top_logprobs
        choice = {"index": index, "text": spelled(echoed)[0] + "".join(s.delta for s in steps),
                  "finish_reason": finish.reason,
                  "logprobs": None if k is None else legacy_logprobs(echoed + generated, k)}
        return choice, len(generated)


def split_delta(splitter: StreamSplitter, text: str, final: bool = False) -> dict:
    """The next streamed delta of a reasoning model: trace text as `reasoning_content` (llama.cpp's
    field), answer text as `content`; empty while a tail might still be a tag."""
    trace, answer = splitter.feed(text, final)
    return ({"reasoning_content": trace} if trace else {}) | ({"content": answer} if answer else {})


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def create_engine_app(engine: Engine, key: str | None = None) -> FastAPI:
    """The engine's HTTP API; with `key`, every route but /health wants `Bearer <key>`."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        given = request.headers.get("authorization", "").encode()
        if key and request.url.path != "/health" and not secrets.compare_digest(given, f"Bearer {key}".encode()):
            return openai_error(401, "Invalid API key.", kind="authentication_error", code="invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    async def steps_of(request: DecodeRequest) -> tuple[asyncio.Queue, threading.Event]:
        """Run the decode in a thread; items arrive on the queue (None ends it); setting the
        event stops the decode."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def work() -> None:
            try:
                for item in engine.run(request, cancelled):
                    loop.call_soon_threadsafe(queue.put_nowait, item)
            except Exception as exc:  # noqa: BLE001 — reported to the client as a server error
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            loop.call_soon_threadsafe(queue.put_nowait, None)

        threading.Thread(target=work, daemon=True).start()
        return queue, cancelled

    async def collect(request: DecodeRequest) -> list:
        queue, _ = await steps_of(request)
        items = []
        while (item := await queue.get()) is not None:
            if isinstance(item, Exception):
                raise item
            items.append(item)
        return items

    def chat_choice(items: list, request: DecodeRequest) -> tuple[dict, int]:
        steps = [i for i in items if isinstance(i, Step) and not i.end]  # llama.cpp's chat lists no end token
        finish = next(i for i in items if isinstance(i, Finish))
        logprobs = None
        if request.top_logprobs is not None:
            logprobs = {"content": [engine.chat_logprobs(s) for s in steps if s.token_id != TEXT_ONLY]}
        text = "".join(s.delta for s in steps)
        message = {"role": "assistant", "content": text}
        if engine.style is not None:  # a reasoning model: the trace apart, as llama.cpp's server gives it
            split = split_text(text, engine.style)
            message = {"role": "assistant", "content": split.answer} | (
                {"reasoning_content": split.trace} if split.trace is not None else {})
        return {"index": 0, "message": message, "finish_reason": finish.reason, "logprobs": logprobs}, \
            finish.completion_tokens

    async def answer(body: dict, chat: bool):
        try:
            requests = engine.requests(body, chat)
        except (ValueError, TypeError) as exc:
            return openai_error(400, str(exc), param=getattr(exc, "param", None))
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if body.get("stream"):
            if len(requests) > 1 or requests[0].echo:
                return openai_error(400, "Streaming takes one prompt, without echo.", param="stream")
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            queue, cancelled = await steps_of(requests[0])
            return StreamingResponse(_stream(queue, cancelled, chat, ident, created, include_usage, requests[0]),
                                     media_type="text/event-stream")
        choices, completion_tokens = [], 0
        for index, request in enumerate(requests):
            try:
                items = await collect(request)
            except Exception as exc:  # noqa: BLE001 — reported to the client as a server error
                return openai_error(500, f"generation failed: {type(exc).__name__}", kind="server_error")
            choice, generated = chat_choice(items, request) if chat else engine.legacy_choice(index, items, request)
            choices.append(choice)
            completion_tokens += generated
        usage = _usage(sum(len(r.prompt_ids) for r in requests), completion_tokens)
        return JSONResponse({"id": ident, "object": kind, "created": created, "model": engine.model_id,
                             "choices": choices, "usage": usage})

    async def _stream(queue: asyncio.Queue, cancelled: threading.Event, chat: bool, ident: str, created: int, include_usage: bool,
                      request: DecodeRequest):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict], usage: dict | None = None) -> bytes:
            data = {"id": ident, "object": kind, "created": created, "model": engine.model_id, "choices": choices}
            if usage is not None:
                data["usage"] = usage
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

        splitter = StreamSplitter(engine.style) if chat and engine.style is not None else None
        so_far = ""
        try:
            if chat:
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            offset, ended = 0, 0
            while (item := await queue.get()) is not None:
                if isinstance(item, Exception):
                    yield b'data: {"error": {"message": "generation failed", "type": "server_error"}}\n\n'
                    return
                if isinstance(item, Step):
                    wants = request.top_logprobs is not None and item.token_id != TEXT_ONLY
                    so_far += item.delta
                    if chat:
                        if item.end:
                            continue
                        logprobs = {"content": [engine.chat_logprobs(item)]} if wants else None
                        delta = split_delta(splitter, so_far) if splitter else {"content": item.delta}
                        if delta or logprobs:
                            yield chunk([{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": None}])
                    else:
                        ended += item.end
                        scored = engine.scored(item.token_id, item.logprob, item.top)
                        logprobs = legacy_logprobs([scored], request.top_logprobs, offset) if wants else None
                        yield chunk([{"index": 0, "text": item.delta, "logprobs": logprobs, "finish_reason": None}])
                    offset += len(item.delta)
                elif isinstance(item, Finish):
                    if splitter and (rest := split_delta(splitter, so_far, final=True)):
                        yield chunk([{"index": 0, "delta": rest, "logprobs": None, "finish_reason": None}])
                    last = {"index": 0, "finish_reason": item.reason}
                    last.update({"delta": {}} if chat else {"text": ""})
                    yield chunk([last])
                    if include_usage:
                        yield chunk([], _usage(item.prompt_tokens, item.completion_tokens + ended))
            yield b"data: [DONE]\n\n"
        finally:  # the client went away (or we are done): stop decoding, free the engine
            cancelled.set()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(await request.json(), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(await request.json(), chat=False)

    return app


def start_hf_engine(folder: Path, *, alias: str, threads: int = 2, host: str = "127.0.0.1",
                    ready_timeout_s: float = 300.0, api_key: str | None = None):
    """Start the engine in a child process; returns once the model is loaded (/health 200).
    With `api_key` (passed through the environment) it answers only `Bearer <api_key>`."""
    from edgedistill.models.llamacpp import spawn_server
    from edgedistill.net import free_port

    port = free_port()
    command = [sys.executable, "-m", "edgedistill.serve.hf_engine", str(folder), "--host", host, "--port", str(port),
               "--threads", str(threads), "--alias", alias, "--parent", str(os.getpid())]
    return spawn_server(command, host, port, f"{folder}: transformers", ready_timeout_s, api_key)


def main(argv: list[str] | None = None) -> int:
    """`python -m edgedistill.serve.hf_engine FOLDER --port N`: serve in the foreground until stopped."""
    import uvicorn

    from edgedistill.errors import UserError
    from edgedistill.models.llamacpp import ENGINE_KEY_ENV, exit_with_parent

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--alias", default="model")
    parser.add_argument("--parent", type=int, default=None, help="Exit when this process is gone.")
    args = parser.parse_args(argv)
    if args.parent:
        exit_with_parent(args.parent)
    try:
        engine = Engine(args.folder, args.alias, args.threads)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    key = os.environ.pop(ENGINE_KEY_ENV, None)
    uvicorn.run(create_engine_app(engine, key), host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
