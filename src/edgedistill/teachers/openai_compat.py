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
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import os
import random
import time
from dataclasses import dataclass

import httpx
import numpy as np

from edgedistill.errors import UserError
from edgedistill.models.hf import Completion, Messages, encode_prompts, load_tokenizer
from edgedistill.models.vocab import VocabMap
from edgedistill.net import is_loopback
from edgedistill.recipe import TOP_LOGPROBS_CAP, GenerateCfg, TeacherCfg
from edgedistill.teachers.base import Sampling, Usage, register_backend

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
    logprobs: list[dict] | None  # choices[0].logprobs.content
    prompt_tokens: int
    completion_tokens: int


def parse_chat_response(body: bytes) -> ServerAnswer:
    """Validate a chat completion body; anything malformed is a RetryableError."""
    try:
        data = json.loads(body)
        choice = data["choices"][0]
        text = choice["message"]["content"]
        if not isinstance(text, str):
            raise TypeError("message.content is not text")
        content = (choice.get("logprobs") or {}).get("content")
        if content is not None and not (isinstance(content, list) and all(isinstance(e, dict) for e in content)):
            raise TypeError("logprobs.content is not a list of objects")
        usage = data.get("usage") or {}
        return ServerAnswer(text, choice.get("finish_reason") == "stop", content,
                            int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise RetryableError(f"malformed response ({type(exc).__name__}: {str(exc)[:80]})") from None


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
        self.on_close: list = []  # e.g. stop the server the llamacpp backend started

    def close(self) -> None:
        while self.on_close:
            self.on_close.pop()()

    # The endpoint -------------------------------------------------------------------------------
    def _body(self, messages: Messages, sampling: Sampling) -> dict:
        body: dict = {**self.cfg.extra_body, "model": self.cfg.model, "messages": messages,
                      "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature, "stream": False}
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
        return parse_chat_response(payload)

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
            completions.append(self._completion(messages, answer, s.top_k_logprobs))
        return completions

    def _completion(self, messages: Messages, answer: ServerAnswer, k: int | None) -> Completion:
        prompt_ids = encode_prompts(self.tokenizer, [messages])[0]
        eos = self.tokenizer.eos_token_id
        completion = Completion(prompt_ids=prompt_ids, token_ids=[], text=answer.text.strip(),
                                finished=answer.finished)
        target = sparse_target(answer.logprobs, self.vocab, min(k, TOP_LOGPROBS_CAP)) \
            if k and answer.logprobs else None
        if target is None:
            if k:
                self.usage.text_only += 1
            completion.token_ids = self.tokenizer(answer.text, add_special_tokens=False)["input_ids"]
            if answer.finished and eos is not None:
                completion.token_ids.append(eos)
            return completion
        ids, topk_ids, topk_lp, tail = target
        if self.tokenizer.decode(ids, skip_special_tokens=True).strip() != completion.text:
            # Every token mapped, yet the ids spell another text: not the same vocabulary.
            self.usage.text_only += 1
            completion.token_ids = self.tokenizer(answer.text, add_special_tokens=False)["input_ids"]
            if answer.finished and eos is not None:
                completion.token_ids.append(eos)
            return completion
        if answer.finished and eos is not None and (not ids or ids[-1] != eos):
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
