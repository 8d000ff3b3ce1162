"""The `openai` teacher: any OpenAI-compatible `/v1/chat/completions` server (vLLM, llama.cpp
server, Ollama, SGLang, the OpenAI API itself), called over httpx with bounded concurrency.

Why our own retry loop rather than the `openai` SDK's: the cost ledger counts every retry (the
SDK hides them), a 200 whose body is malformed or truncated must be retried like a 5xx (the
SDK raises), and a server's Retry-After is honoured up to our own cap. The loop is small:
exponential backoff with full jitter, Retry-After in seconds or as an HTTP date.

Token ids: a server answers in text. `logprobs.content[i]` holds each answer token's text
and bytes (llama.cpp adds its id) and its top alternatives. They become KD targets only when
every token maps onto the local tokenizer's vocabulary — by id when the server sends ids,
checked against the token's bytes, otherwise by bytes. When they do not, the answer is kept
as text and tokenised locally, so training falls back to sequence-level KD for it.

Reasoning teachers: the trace comes in `message.reasoning` or `reasoning_content` (or as a
`<think>` block in the content of a server without a reasoning parser) and is kept apart from
the answer. `logprobs.content` runs over trace and answer in generation order; it is cut at
the end of the trace so each part gets its own targets (`split_entries`), tokens a thinking
budget forced lose the teacher's distribution, and a part whose entries do not spell its text
is kept as text.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import os
import random
import time
from dataclasses import dataclass, replace

import httpx
import numpy as np

from edgedistill.errors import UserError
from edgedistill.models.hf import Completion, Messages, encode_prompts, load_tokenizer
from edgedistill.models.reasoning import (
    HARMONY,
    THINK_TAGS,
    ReasoningStyle,
    split_pieces,
    split_text,
)
from edgedistill.models.vocab import VocabMap
from edgedistill.net import is_loopback
from edgedistill.recipe import TOP_LOGPROBS_CAP, GenerateCfg, TeacherCfg
from edgedistill.teachers.base import Sampling, Usage, register_backend, template_kwargs

RETRY_STATUS = frozenset({408, 409, 425, 429})  # plus every 5xx
# Log-prob of the buckets a short top list does not fill: zero mass (the KD losses skip p = 0
# terms explicitly, so -inf never meets an arithmetic that would turn it into nan).
EMPTY_LOGPROB = float("-inf")


class RetryableError(Exception):
    """One failed attempt worth repeating; `retry_after` is the server's hint in seconds."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date; None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_delay(attempt: int, base: float, cap: float, retry_after: float | None,
                  rng: random.Random) -> float:
    """Full-jitter exponential backoff (attempt 0 = first retry); Retry-After wins when longer."""
    delay = rng.uniform(0.0, min(cap, base * 2 ** attempt))
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay


# --- the server, once, before any prompt ------------------------------------------------------

def probe_server(base_url: str, model: str, headers: dict[str, str], timeout_s: float) -> None:
    """GET {base_url}/models once before the stage, so a wrong URL or a server that is not an
    OpenAI API is one line naming what came back — not a minute of silent retries ending in
    "failed on 12 of 12 prompts". (Found by a new user: nothing listening, and a plain web
    server answering HTML, both looked like a flaky teacher.)"""
    url = base_url.rstrip("/") + "/models"
    try:
        response = httpx.get(url, headers=headers, timeout=timeout_s, trust_env=False)
    except httpx.ConnectError as exc:
        raise UserError(f"teacher.base_url: nothing answers at {base_url} ({_reason(exc)}) — start the server "
                        "or fix the URL") from None
    except httpx.TimeoutException:
        raise UserError(f"teacher.base_url: {url} did not answer within {timeout_s:.0f} s — is the server "
                        "up (a model may still be loading)?") from None
    except httpx.HTTPError as exc:
        raise UserError(f"teacher.base_url: {url}: {type(exc).__name__}: {exc}") from None
    if response.status_code in (401, 403):
        raise UserError(f"teacher: {url} refused the request (HTTP {response.status_code}) — set "
                        "teacher.api_key_env to the variable holding the API key, or check the key")
    kind = response.headers.get("content-type", "?").split(";")[0]
    try:
        listed = response.json()["data"]
        served = [str(entry["id"]) for entry in listed]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"teacher.base_url: {url} answered HTTP {response.status_code} with {kind}, not an "
                        "OpenAI model list — is base_url the server's /v1 root (e.g. http://host:8000/v1)?") from None
    if response.status_code >= 400:
        raise UserError(f"teacher.base_url: {url} answered HTTP {response.status_code}")
    if served and model not in served:
        shown = ", ".join(served[:8]) + (f" and {len(served) - 8} more" if len(served) > 8 else "")
        raise UserError(f"teacher.model: '{model}' is not served at {base_url} (it serves: {shown})")


def _reason(exc: Exception) -> str:
    text = str(exc).lower()
    return "connection refused" if "refused" in text else (str(exc) or type(exc).__name__)


# --- response parsing --------------------------------------------------------------------------

@dataclass
class ServerAnswer:
    text: str
    finished: bool
    logprobs: list[dict] | None  # choices[0].logprobs.content: trace tokens first when there is a trace
    prompt_tokens: int
    completion_tokens: int
    reasoning: str | None = None  # the trace, where the server's reasoning parser put it
    reasoning_tokens: int | None = None  # usage.completion_tokens_details.reasoning_tokens, when counted


def reasoning_of(message: dict) -> str | None:
    """The trace of a message or a streamed delta. vLLM >= 0.11.1 and Ollama write `reasoning`;
    llama.cpp and vLLM <= 0.11.0 `reasoning_content` (vLLM 0.11.1-0.15 sends both, the same)."""
    for key in ("reasoning", "reasoning_content"):
        if isinstance(message.get(key), str) and message[key]:
            return message[key]
    return None


def _logprob_entries(choice: dict) -> list[dict] | None:
    content = (choice.get("logprobs") or {}).get("content")
    if content is not None and not (isinstance(content, list) and all(isinstance(e, dict) for e in content)):
        raise TypeError("logprobs.content is not a list of objects")
    return content


def _usage_counts(usage: dict) -> tuple[int, int, int | None]:
    details = usage.get("completion_tokens_details") or {}
    reasoning = details.get("reasoning_tokens") if isinstance(details, dict) else None
    return (int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
            int(reasoning) if isinstance(reasoning, int) else None)


def _malformed(exc: Exception) -> RetryableError:
    return RetryableError(f"malformed response ({type(exc).__name__}: {str(exc)[:80]})")


def parse_chat_response(body: bytes) -> ServerAnswer:
    """Validate a chat completion body; anything malformed is a RetryableError. A reasoning
    model cut by max_tokens inside its trace answers `content: null` (vLLM) or "" (llama.cpp):
    with a trace present that is an answer, not a broken body."""
    try:
        data = json.loads(body)
        choice = data["choices"][0]
        message = choice["message"]
        reasoning = reasoning_of(message)
        text = message["content"]
        if text is None and reasoning is not None:
            text = ""
        if not isinstance(text, str):
            raise TypeError("message.content is not text")
        counts = _usage_counts(data.get("usage") or {})
        return ServerAnswer(text, choice.get("finish_reason") == "stop", _logprob_entries(choice), *counts[:2],
                            reasoning, counts[2])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise _malformed(exc) from None


def parse_chat_stream(body: bytes) -> ServerAnswer:
    """A streamed (SSE) chat completion put back together: content and trace deltas joined,
    logprob entries in order. llama.cpp's stream leaves out the entries of the tokens its
    reasoning parser holds back (`<think>` pieces, `</think>`, end of turn: 11 of 18 listed,
    measured), so a streamed trace rarely maps onto token targets; vLLM sends `"delta": {}`
    chunks to carry them. A stream that stops before a finish_reason is retried."""
    text, trace, entries = [], [], []
    listed, finish, usage = False, None, {}
    try:
        for line in body.decode("utf-8").splitlines():
            if not line.startswith("data:"):  # SSE comments, event names, blank lines
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if isinstance(delta.get("content"), str):
                    text.append(delta["content"])
                if (piece := reasoning_of(delta)) is not None:
                    trace.append(piece)
                if (more := _logprob_entries(choice)) is not None:
                    listed, entries = True, entries + more
                finish = choice.get("finish_reason") or finish
        if finish is None:
            raise ValueError("the stream ended before a finish_reason")
        counts = _usage_counts(usage)
    except (ValueError, AttributeError, TypeError) as exc:
        raise _malformed(exc) from None
    return ServerAnswer("".join(text), finish == "stop", entries if listed else None, *counts[:2],
                        "".join(trace) or None, counts[2])


def _fill_row(ids: list[int], logprobs: list[float], k: int) -> tuple[list[int], list[float]]:
    """Pad a short top list to k with ids not in it and zero mass, so rows stack."""
    ids, logprobs = ids[:k], logprobs[:k]
    candidate = 0
    while len(ids) < k:
        if candidate not in ids:
            ids.append(candidate)
            logprobs.append(EMPTY_LOGPROB)
        candidate += 1
    return ids, logprobs


def _tail(logprobs: list[float]) -> float:
    """log(1 - sum p) of a server's top list (servers give no exact tail; clamp at float32 eps)."""
    finite = [lp for lp in logprobs if math.isfinite(lp)]
    mass = sum(math.exp(lp) for lp in finite)
    return math.log(max(1.0 - mass, 1e-7))


def _certain_row(token: int, k: int) -> tuple[list[int], list[float], float]:
    """A position where only the chosen token is known: all the mass on it."""
    ids, lps = _fill_row([token], [0.0], k)
    return ids, lps, EMPTY_LOGPROB


def sparse_target(content: list[dict], vocab: VocabMap, k: int) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray] | None:
    """(answer ids, topk ids, topk log-probs, tail) from logprobs.content, or None if any token
    (chosen or alternative) is outside the local vocabulary.

    llama.cpp leaves out the entries of tokens that end inside a UTF-8 character and hands
    their bytes to the next entry (measured: 日 arrives as one entry for two tokens). The
    missing token is recovered from those leading bytes when they are exactly one token of
    the vocabulary (longest match first); its distribution is unknown, so its row puts all the
    mass on it. The caller checks that the ids spell the answer's text."""
    answer, rows_ids, rows_lp, tails = [], [], [], []
    for entry in content:
        chosen = vocab.lookup(entry, chosen=True)
        if chosen is None:
            return None
        raw = bytes(entry.get("bytes") or [])
        own = vocab.id_bytes.get(chosen, b"")
        if isinstance(entry.get("id"), int) and own and raw != own:
            pending = vocab.split(raw[:-len(own)])
            if pending is None:
                return None
            for token in pending:
                ids, lps, tail = _certain_row(token, k)
                answer.append(token)
                rows_ids.append(ids)
                rows_lp.append(lps)
                tails.append(tail)
        ids, lps = [], []
        for alt in entry.get("top_logprobs") or []:
            idx = vocab.lookup(alt)
            if idx is None:
                return None
            if idx not in ids:
                ids.append(idx)
                lps.append(float(alt["logprob"]))
        if not ids:  # no alternatives sent: the chosen token is all we know
            ids, lps = [chosen], [float(entry["logprob"])]
        answer.append(chosen)
        tails.append(_tail(lps))
        ids, lps = _fill_row(ids, lps, k)
        rows_ids.append(ids)
        rows_lp.append(lps)
    return (answer, np.asarray(rows_ids, dtype=np.int32).reshape(-1, k),
            np.asarray(rows_lp, dtype=np.float16).reshape(-1, k), np.asarray(tails, dtype=np.float32))


def trace_in_content(answer: ServerAnswer) -> ServerAnswer:
    """A server without a reasoning parser (llama.cpp --reasoning-format none, vLLM without
    --reasoning-parser) leaves `<think>…</think>` in the content: split it there."""
    if answer.reasoning is not None or not answer.text.lstrip().startswith(THINK_TAGS[0]):
        return answer
    split = split_text(answer.text, ReasoningStyle())
    return replace(answer, reasoning=split.trace or "", text=split.answer)


Target = tuple[list[int], np.ndarray, np.ndarray, np.ndarray]
STAND_IN = "\ufffc"  # the text of an entry that has none (llama.cpp's end of turn)


def _piece(entry: dict) -> str:
    """An entry's text; special tokens (empty bytes on llama.cpp) get a stand-in that is not
    whitespace, so an end-of-turn entry stays with the answer."""
    raw = bytes(entry.get("bytes") or [])
    text = raw.decode("utf-8", "replace") if raw else str(entry.get("token") or "")
    return text or STAND_IN


def _forced(entry: dict) -> bool:
    """A token the sampler did not choose: the server lists alternatives and the token is not
    among them. A thinking budget forces its message and `</think>`; llama.cpp reports the
    model's own log-prob for them (-7.24 for a forced `</think>`, measured), vLLM e.g. -20.6. A
    grammar forces tokens the same way; a token sampled from beyond the listed top-k (temperature
    > 0, rare at k = 20) is treated alike."""
    alternatives = entry.get("top_logprobs") or []
    key = "id" if isinstance(entry.get("id"), int) else "token"
    return bool(alternatives) and all(alt.get(key) != entry.get(key) for alt in alternatives)


def _masked(entry: dict) -> dict:
    """The entry with its distribution dropped: the target puts all the mass on the token (CE)."""
    return {**entry, "logprob": 0.0, "top_logprobs": []}


def _cut_by_text(pieces: list[str], reasoning: str, answer: str) -> int | None:
    """The entry index where the trace ends when the entries spell the trace, then the answer,
    with no delimiter between (Ollama's parser drops the tags from its text)."""
    joined = ""
    for i, piece in enumerate(pieces):
        joined += piece
        if joined.strip() == reasoning.strip() and \
                "".join(pieces[i + 1:]).replace(STAND_IN, "").strip() == answer.strip():
            return i + 1
    return None


def split_entries(entries: list[dict], reasoning: str, answer: str
                  ) -> tuple[list[dict] | None, list[dict] | None, int]:
    """logprobs.content of a reasoning answer cut into (trace entries, answer entries, forced
    rows masked). The list runs in generation order — trace, end of trace (`</think>`, or
    harmony's `<|end|><|start|>assistant<|channel|>final<|message|>`), answer, end of turn — in
    vLLM (`_create_chat_logprobs` over all token ids) and llama.cpp (measured); the delimiter
    belongs to neither side. Without a delimiter the text decides; (None, None, 0) when neither
    tells them apart (a streamed llama.cpp answer misses the entries it held back)."""
    pieces = [_piece(e) for e in entries]
    style = HARMONY if "<|channel|>" in pieces else ReasoningStyle(opened=True)
    split = split_pieces(pieces, style)
    trace, answer_range = split.trace, split.answer
    if answer.strip() and not split.closed:
        cut = _cut_by_text(pieces, reasoning, answer)
        if cut is None:
            return None, None, 0
        trace, answer_range = range(cut), range(cut, len(entries))
    kept = [_masked(e) if _forced(e) else e for e in entries]
    forced = sum(kept[i] is not entries[i] for i in (*trace, *answer_range))
    return [kept[i] for i in trace], [kept[i] for i in answer_range], forced


# --- the teacher -------------------------------------------------------------------------------

class OpenAITeacher:
    """Batches of chat requests, `concurrency` in flight, each retried until it succeeds or
    `max_retries` is spent (then None: counted as a failure, never stored)."""

    def __init__(self, teacher_cfg: TeacherCfg, gen_cfg: GenerateCfg):
        self.cfg = teacher_cfg
        self.gen_cfg = gen_cfg
        self.model_id = teacher_cfg.model
        self.usage = Usage()
        self.headers = {"Content-Type": "application/json"}
        if teacher_cfg.api_key_env:
            key = os.environ.get(teacher_cfg.api_key_env)
            if not key:
                raise UserError(f"teacher.api_key_env: environment variable {teacher_cfg.api_key_env} "
                                "is not set — export the API key under that name")
            self.headers["Authorization"] = f"Bearer {key}"
        if os.environ.get("EDGEDISTILL_OFFLINE") and not is_loopback(teacher_cfg.base_url):
            raise UserError(f"teacher.base_url: {teacher_cfg.base_url} is not on this machine and "
                            "EDGEDISTILL_OFFLINE is set — use a loopback server or unset it")
        probe_server(teacher_cfg.base_url, teacher_cfg.model, self.headers, min(teacher_cfg.timeout_s, 30.0))
        if not teacher_cfg.tokenizer:
            raise UserError("teacher.tokenizer: the openai backend needs a local tokenizer (the student's: "
                            "'embedded', a model folder or a .gguf) to turn answers into token ids")
        self.tokenizer = load_tokenizer(teacher_cfg.tokenizer)
        self.vocab = VocabMap(self.tokenizer)
        self.rng = random.Random(0)
        self.template_kwargs = template_kwargs(teacher_cfg)
        self.on_close: list = []  # e.g. stop the server the llamacpp backend started

    def close(self) -> None:
        while self.on_close:
            self.on_close.pop()()

    # The endpoint -------------------------------------------------------------------------------
    def _body(self, messages: Messages, sampling: Sampling) -> dict:
        body: dict = {**self.cfg.extra_body, "model": self.cfg.model, "messages": messages,
                      "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature,
                      "stream": self.cfg.stream}
        if self.cfg.stream:
            body["stream_options"] = {"include_usage": True}
        if self.cfg.reasoning_effort:  # vLLM, llama.cpp and Ollama read it ('none' turns thinking off)
            body["reasoning_effort"] = self.cfg.reasoning_effort
        if sampling.top_k_logprobs:
            body |= {"logprobs": True, "top_logprobs": min(sampling.top_k_logprobs, TOP_LOGPROBS_CAP)}
        return body

    async def _attempt(self, client: httpx.AsyncClient, body: dict) -> ServerAnswer:
        try:
            response = await client.post("/chat/completions", json=body, headers=self.headers)
            payload = await response.aread()
        except httpx.TimeoutException:
            raise RetryableError("timeout") from None
        except httpx.TransportError as exc:  # refused, reset, truncated mid-body
            raise RetryableError(f"connection error ({type(exc).__name__})") from None
        status = response.status_code
        if status in RETRY_STATUS or status >= 500:
            raise RetryableError(f"HTTP {status}", parse_retry_after(response.headers.get("retry-after")))
        if status in (401, 403):
            raise UserError(f"teacher: {self.cfg.base_url} refused the request (HTTP {status}) — "
                            + (f"check the key in ${self.cfg.api_key_env}" if self.cfg.api_key_env
                               else "set teacher.api_key_env to the variable holding the API key"))
        if status == 404:
            raise UserError(f"teacher: {self.cfg.base_url}/chat/completions answered 404 — check "
                            f"teacher.base_url (it ends in /v1) and teacher.model ('{self.cfg.model}')")
        if status >= 400:
            raise UserError(f"teacher: {self.cfg.base_url} rejected the request (HTTP {status}: "
                            f"{payload[:200].decode('utf-8', 'replace')})")
        return parse_chat_stream(payload) if self.cfg.stream else parse_chat_response(payload)

    async def _ask(self, client: httpx.AsyncClient, gate: asyncio.Semaphore, messages: Messages,
                   sampling: Sampling) -> ServerAnswer | None:
        body = self._body(messages, sampling)
        async with gate:
            for attempt in range(self.cfg.max_retries + 1):
                try:
                    return await self._attempt(client, body)
                except RetryableError as exc:
                    if attempt == self.cfg.max_retries:
                        self.usage.failures += 1
                        return None
                    self.usage.retries += 1
                    await asyncio.sleep(backoff_delay(attempt, self.cfg.backoff_s, self.cfg.backoff_max_s,
                                                      exc.retry_after, self.rng))
        return None

    async def _ask_all(self, batch: list[Messages], sampling: Sampling) -> list[ServerAnswer | None]:
        gate = asyncio.Semaphore(self.cfg.concurrency)
        limits = httpx.Limits(max_connections=self.cfg.concurrency, max_keepalive_connections=self.cfg.concurrency)
        async with httpx.AsyncClient(base_url=self.cfg.base_url.rstrip("/"), timeout=self.cfg.timeout_s,
                                     limits=limits, trust_env=False) as client:
            return await asyncio.gather(*(self._ask(client, gate, m, sampling) for m in batch))

    # The Teacher protocol -----------------------------------------------------------------------
    def chat(self, batch: list[Messages], sampling: Sampling | None = None) -> list[Completion | None]:
        s = sampling or Sampling(self.gen_cfg.max_new_tokens, self.gen_cfg.temperature, self.gen_cfg.top_k_logprobs)
        answers = asyncio.run(self._ask_all(batch, s))
        self.usage.requests += len(batch)
        completions: list[Completion | None] = []
        for messages, answer in zip(batch, answers):
            if answer is None:
                completions.append(None)
                continue
            self.usage.prompt_tokens += answer.prompt_tokens
            self.usage.completion_tokens += answer.completion_tokens
            completion = self._completion(messages, answer, s.top_k_logprobs)
            completion.generated_tokens = answer.completion_tokens
            completions.append(completion)
        return completions

    def _target(self, entries: list[dict] | None, text: str, k: int | None) -> Target | None:
        """The sparse target of some logprob entries, when they map onto the local vocabulary
        and spell `text` (every token may map, yet spell another text: another vocabulary)."""
        target = sparse_target(entries, self.vocab, min(k, TOP_LOGPROBS_CAP)) if k and entries else None
        if target is None or self.tokenizer.decode(target[0], skip_special_tokens=True).strip() != text.strip():
            return None
        return target

    def _completion(self, messages: Messages, answer: ServerAnswer, k: int | None) -> Completion:
        answer = trace_in_content(answer)
        prompt_ids = encode_prompts(self.tokenizer, [messages], template_kwargs=self.template_kwargs)[0]
        completion = Completion(prompt_ids=prompt_ids, token_ids=[], text=answer.text.strip(),
                                finished=answer.finished)
        entries = answer.logprobs
        if answer.reasoning is not None:
            entries = self._take_reasoning(completion, answer, k)
        target = self._target(entries, completion.text, k)
        if target is None:
            if k and (answer.reasoning is None or completion.text):
                self.usage.text_only += 1
            completion.token_ids = self.tokenizer(completion.text if answer.reasoning is not None else answer.text,
                                                  add_special_tokens=False)["input_ids"]
            if answer.finished and self.tokenizer.eos_token_id is not None:
                completion.token_ids.append(self.tokenizer.eos_token_id)
            return completion
        return self._with_target(completion, target, answer.finished)

    def _take_reasoning(self, completion: Completion, answer: ServerAnswer, k: int | None) -> list[dict] | None:
        """Put the trace (and its target, when its tokens map) on the completion; return the
        logprob entries of the answer alone, or None when they cannot be told apart."""
        completion.reasoning = answer.reasoning.strip() or None
        trace_entries = answer_entries = None
        if answer.logprobs:
            trace_entries, answer_entries, forced = split_entries(answer.logprobs, answer.reasoning, answer.text)
            self.usage.forced_rows += forced
        target = self._target(trace_entries, answer.reasoning, k)
        if target is None:  # no logprobs (Ollama before 0.12.11, another vocabulary): the text alone
            completion.take_reasoning(self.tokenizer(completion.reasoning or "", add_special_tokens=False)["input_ids"],
                                      None)
        else:
            completion.take_reasoning(target[0], target[1:])
        self.usage.reasoning_tokens += (answer.reasoning_tokens if answer.reasoning_tokens is not None
                                        else len(trace_entries) if trace_entries is not None
                                        else len(completion.reasoning_ids))
        return answer_entries

    def _with_target(self, completion: Completion, target: Target, finished: bool) -> Completion:
        ids, topk_ids, topk_lp, tail = target
        eos = self.tokenizer.eos_token_id
        if finished and eos is not None and (not ids or ids[-1] != eos):
            # The server stopped on end-of-turn but does not list it: the teacher chose it, so
            # the target there is that token with all the mass.
            ids.append(eos)
            row_ids, row_lp, row_tail = _certain_row(eos, topk_ids.shape[1])
            topk_ids = np.vstack([topk_ids, np.asarray([row_ids], dtype=np.int32)])
            topk_lp = np.vstack([topk_lp, np.asarray([row_lp], dtype=np.float16)])
            tail = np.append(tail, np.float32(row_tail))
        completion.token_ids = ids
        completion.topk_ids, completion.topk_logprobs, completion.tail_logprobs = topk_ids, topk_lp, tail
        return completion


@register_backend("openai")
def _make_openai_teacher(teacher_cfg: TeacherCfg, gen_cfg: GenerateCfg) -> OpenAITeacher:
    return OpenAITeacher(teacher_cfg, gen_cfg)
