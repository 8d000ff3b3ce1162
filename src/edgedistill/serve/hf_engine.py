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
while torch holds the cores, and the engine dies with its parent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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

TEXT_ONLY = -1


@dataclass
class DecodeRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no logprobs; 0..20: the chosen token (+ that many alternatives)


@dataclass
class Step:
    """One generated token: the text it releases (may be empty) and its log-probabilities.
    token_id TEXT_ONLY: text held back until the end, no token of its own."""

    token_id: int
    delta: str
    logprob: float
    top: list[tuple[int, float]]


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


@torch.inference_mode()
def decode(model, tokenizer, request: DecodeRequest, end_ids: set[int],
           cancelled: threading.Event | None = None, keep_special: bool = False) -> Iterator[Step | Finish]:
    """Generate token by token; yields Steps, then one Finish. Text is released only once it
    is whole UTF-8 and cannot be the start of a stop string; a stop string ends the answer
    and is not part of it."""
    generator = torch.Generator().manual_seed(request.seed if request.seed is not None else
                                              int.from_bytes(uuid.uuid4().bytes[:6], "little"))
    out = model(input_ids=torch.tensor([request.prompt_ids]), use_cache=True)
    cache, logits = out.past_key_values, out.logits[0, -1]
    text = Detokenizer(tokenizer, keep_special)
    released = 0
    reason, stopped_by_string = "length", False
    while len(text.tokens) < request.max_tokens and not (cancelled and cancelled.is_set()):
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        token = _draw(logits, request, generator)
        if token in end_ids:
            reason = "stop"
            break
        text.add(token)
        top: list[tuple[int, float]] = []
        if request.top_logprobs:
            values, ids = logprobs.topk(request.top_logprobs)
            top = list(zip(ids.tolist(), values.tolist()))
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
        # A reasoning model's trace goes to `reasoning_content`, as llama.cpp's server does it.
        self.style = model_style(folder, self.tokenizer)
        self.lock = threading.Lock()

    # ---- requests -> DecodeRequest ---------------------------------------------------------
    def request(self, body: dict, chat: bool) -> DecodeRequest:
        """Raises ValueError with a client-facing message for what the engine cannot do."""
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ValueError("'messages' must be a non-empty list.")
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            top = body.get("top_logprobs", 0) if body.get("logprobs") else None
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise ValueError("'prompt' must be a string.")
            ids = self.tokenizer(prompt)["input_ids"]
            top = body.get("logprobs")
        if len(ids) >= self.context:
            raise ValueError(f"The prompt is {len(ids)} tokens; this model's context is {self.context}.")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else [s for s in stop if isinstance(s, str) and s]
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or 256
        return DecodeRequest(
            prompt_ids=ids, max_tokens=min(int(max_tokens), self.context - len(ids)),
            temperature=1.0 if body.get("temperature") is None else float(body["temperature"]),
            top_p=float(body.get("top_p") or 1.0), seed=body.get("seed"), stop=stop,
            top_logprobs=None if top is None or top is False else int(top))

    def run(self, request: DecodeRequest, cancelled: threading.Event | None = None) -> Iterator[Step | Finish]:
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

    def completion_logprobs(self, steps: list[Step], offset: int) -> dict:
        tokens = [self._entry(s.token_id, s.logprob) for s in steps]
        offsets, at = [], offset
        for s in steps:
            offsets.append(at)
            at += len(s.delta)
        return {"tokens": [t["token"] for t in tokens], "token_logprobs": [t["logprob"] for t in tokens],
                "top_logprobs": [{self._entry(i, lp)["token"]: lp for i, lp in s.top} for s in steps],
                "text_offset": offsets}


def split_delta(splitter: StreamSplitter, text: str, final: bool = False) -> dict:
    """The next streamed delta of a reasoning model: trace text as `reasoning_content` (llama.cpp's
    field), answer text as `content`; empty while a tail might still be a tag."""
    trace, answer = splitter.feed(text, final)
    return ({"reasoning_content": trace} if trace else {}) | ({"content": answer} if answer else {})


def _usage(finish: Finish) -> dict:
    return {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens,
            "total_tokens": finish.prompt_tokens + finish.completion_tokens}


def create_engine_app(engine: Engine) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    def error(message: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)

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

    async def answer(body: dict, chat: bool):
        try:
            request = engine.request(body, chat)
        except (ValueError, TypeError) as exc:
            return error(str(exc))
        queue, cancelled = await steps_of(request)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_stream(queue, cancelled, chat, ident, created, include_usage, request),
                                     media_type="text/event-stream")
        steps: list[Step] = []
        while (item := await queue.get()) is not None:
            if isinstance(item, Exception):
                return error(f"generation failed: {type(item).__name__}", 500)
            if isinstance(item, Step):
                steps.append(item)
            else:
                finish = item
        text = "".join(s.delta for s in steps)
        real = [s for s in steps if s.token_id != TEXT_ONLY]
        if chat:
            message = {"role": "assistant", "content": text}
            if engine.style is not None:
                split = split_text(text, engine.style)
                message = {"role": "assistant", "content": split.answer} | (
                    {"reasoning_content": split.trace} if split.trace is not None else {})
            choice = {"index": 0, "message": message, "finish_reason": finish.reason,
                      "logprobs": {"content": [engine.chat_logprobs(s) for s in real]}
                      if request.top_logprobs is not None else None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish.reason,
                      "logprobs": engine.completion_logprobs(real, 0) if request.top_logprobs is not None else None}
        return JSONResponse({"id": ident, "object": kind, "created": created, "model": engine.model_id,
                             "choices": [choice], "usage": _usage(finish)})

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
            offset = 0
            while (item := await queue.get()) is not None:
                if isinstance(item, Exception):
                    yield b'data: {"error": {"message": "generation failed", "type": "server_error"}}\n\n'
                    return
                if isinstance(item, Step):
                    wants = request.top_logprobs is not None and item.token_id != TEXT_ONLY
                    so_far += item.delta
                    if chat:
                        logprobs = {"content": [engine.chat_logprobs(item)]} if wants else None
                        delta = split_delta(splitter, so_far) if splitter else {"content": item.delta}
                        if delta or logprobs:
                            yield chunk([{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": None}])
                    else:
                        logprobs = engine.completion_logprobs([item], offset) if wants else None
                        yield chunk([{"index": 0, "text": item.delta, "logprobs": logprobs, "finish_reason": None}])
                    offset += len(item.delta)
                else:
                    if splitter and (rest := split_delta(splitter, so_far, final=True)):
                        yield chunk([{"index": 0, "delta": rest, "logprobs": None, "finish_reason": None}])
                    last = {"index": 0, "finish_reason": item.reason}
                    last.update({"delta": {}} if chat else {"text": ""})
                    yield chunk([last])
                    if include_usage:
                        yield chunk([], _usage(item))
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
                    ready_timeout_s: float = 300.0):
    """Start the engine in a child process; returns once the model is loaded (/health 200)."""
    import os

    from edgedistill.models.llamacpp import spawn_server
    from edgedistill.net import free_port

    port = free_port()
    command = [sys.executable, "-m", "edgedistill.serve.hf_engine", str(folder), "--host", host, "--port", str(port),
               "--threads", str(threads), "--alias", alias, "--parent", str(os.getpid())]
    return spawn_server(command, host, port, f"{folder}: transformers", ready_timeout_s)


def main(argv: list[str] | None = None) -> int:
    """`python -m edgedistill.serve.hf_engine FOLDER --port N`: serve in the foreground until stopped."""
    import uvicorn

    from edgedistill.errors import UserError
    from edgedistill.models.llamacpp import exit_with_parent

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
    uvicorn.run(create_engine_app(engine), host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
