"""The OpenAI wire format both engines share: request checks, the forms a legacy prompt takes,
and the legacy `/v1/completions` log-probability layout.

Why checks in one place, in front of both engines: a field a request asks for and the engine
does not honour must be a 400 that names it, never a 200 without it. lm-evaluation-harness
scored every choice 0 when `echo` was silently ignored and reported a meaningless accuracy
(issue #22); `messages: []` or `temperature: -5` went through with 200 (issue #20).

The legacy layout (OpenAI's `Completion.choices[i].logprobs`, as the `openai` client's
`completion_choice.Logprobs` types it): `tokens`, `token_logprobs`, `top_logprobs` (one
`{token: logprob}` dict per token), `text_offset`. With `echo` the prompt's tokens come first
and the first one has `null` log-probabilities (nothing conditions it), as OpenAI did.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from edgedistill.recipe import TOP_LOGPROBS_CAP

ROLES = ("system", "user", "assistant", "tool")
# Fields the transformers engine honours; anything else is refused by name. llama.cpp's server
# takes many more (top_k, min_p, grammar, logit_bias, penalties, ...), so there the front
# refuses only the OpenAI fields no engine here implements.
TRANSFORMERS_FIELDS = {
    "chat/completions": {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                         "seed", "stop", "stream", "stream_options", "logprobs", "top_logprobs", "n", "user"},
    "completions": {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
                    "stream_options", "logprobs", "echo", "n", "best_of", "suffix", "user"},
}
UNSET = (None, False, 0, "", [], {})  # a field sent with its "off" value asks for nothing


class RequestError(ValueError):
    """A request the server will not answer; `param` names the field (OpenAI's error.param)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def openai_error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_range(body: dict, field: str, low: float, high: float) -> None:
    value = body.get(field)
    if value is not None and not (_is_number(value) and low <= value <= high):
        raise RequestError(f"'{field}' must be a number from {low:g} to {high:g}.", field)


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects.", "messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"'{where}' must be an object with 'role' and 'content'.", where)
        if message.get("role") not in ROLES:
            raise RequestError(f"'{where}.role' must be one of {', '.join(ROLES)} (got {message.get('role')!r}).",
                               f"{where}.role")
        content = message.get("content")
        tool_call = message["role"] == "assistant" and content is None and message.get("tool_calls")
        if not isinstance(content, (str, list)) and not tool_call:
            raise RequestError(f"'{where}.content' must be a string or a list of content parts.", f"{where}.content")


def prompt_list(prompt: object) -> list[str | list[int]]:
    """The legacy `prompt` as a list of prompts: a string, a list of strings, a list of token
    ids, or a list of token-id lists (one choice per prompt, in order)."""
    def ids(value: object) -> bool:
        return isinstance(value, list) and bool(value) and all(_is_int(t) and t >= 0 for t in value)

    if isinstance(prompt, str):
        return [prompt]
    if ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or ids(p) for p in prompt):
        return list(prompt)
    raise RequestError("'prompt' must be a string, a list of strings, a list of token ids or a list of "
                       "token-id lists (none empty).", "prompt")


def check_request(body: dict, endpoint: str, engine: str, max_tokens_cap: int) -> None:
    """Raises RequestError naming the first field the server cannot honour as asked.
    `endpoint` is "chat/completions" or "completions"; `engine` "llamacpp" or "transformers"."""
    chat = endpoint == "chat/completions"
    if engine == "transformers":
        extra = sorted(f for f, v in body.items() if f not in TRANSFORMERS_FIELDS[endpoint] and v not in UNSET)
        if extra:
            raise RequestError(f"'{extra[0]}' is not supported by the transformers engine.", extra[0])
    if body.get("n") not in (None, 1):
        raise RequestError("'n' above 1 is not supported: send one request per completion.", "n")
    if chat:
        _check_messages(body.get("messages"))
        if body.get("logprobs") is not None and not isinstance(body["logprobs"], bool):
            raise RequestError("'logprobs' must be true or false.", "logprobs")
        k_field = "top_logprobs"
    else:
        if "prompt" not in body:
            raise RequestError("'prompt' is required.", "prompt")
        prompt_list(body["prompt"])
        for field in ("best_of", "suffix"):
            if body.get(field) not in (None, 1 if field == "best_of" else ""):
                raise RequestError(f"'{field}' is not supported by this server.", field)
        if body.get("echo") is not None and not isinstance(body["echo"], bool):
            raise RequestError("'echo' must be true or false.", "echo")
        if body.get("echo") and body.get("stream"):
            raise RequestError("'echo' with 'stream' is not supported: ask without streaming.", "echo")
        k_field = "logprobs"
    k = body.get(k_field)
    if k is not None and not (_is_int(k) and 0 <= k <= TOP_LOGPROBS_CAP):
        raise RequestError(f"{k_field} must be between 0 and {TOP_LOGPROBS_CAP}.", k_field)
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(field)
    lowest = 0 if body.get("echo") else 1  # legacy scoring: echo the prompt, generate nothing
    if max_tokens is not None and not (_is_int(max_tokens) and max_tokens >= lowest):
        raise RequestError(f"max_tokens must be a {'non-negative' if lowest == 0 else 'positive'} integer.", field)
    if _is_int(max_tokens) and max_tokens > max_tokens_cap:
        raise RequestError(f"max_tokens {max_tokens} is above this server's limit of {max_tokens_cap}.", field)
    _check_range(body, "temperature", 0, 2)
    _check_range(body, "top_p", 0, 1)
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise RequestError("'stop' must be a string or a list of strings.", "stop")
    if body.get("seed") is not None and not _is_int(body["seed"]):
        raise RequestError("'seed' must be an integer.", "seed")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):
        raise RequestError("'stream' must be true or false.", "stream")


# ---- the legacy log-probability layout ---------------------------------------------------------
@dataclass
class Scored:
    """One token of a legacy completion: its bytes, its log-probability (None for the first
    prompt token) and the most likely tokens at its position, as (bytes, log-probability)."""

    raw: bytes
    logprob: float | None
    top: list[tuple[bytes, float]]


def token_text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def spelled(tokens: list[Scored]) -> tuple[str, list[int]]:
    """The text the tokens spell and each token's character offset in it. A token that ends
    inside a UTF-8 character starts where that character starts (bytes are decoded
    incrementally, so a split character is one character, not one U+FFFD per piece)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    text, offsets = "", []
    for token in tokens:
        offsets.append(len(text))
        text += decoder.decode(token.raw)
    return text + decoder.decode(b"", final=True), offsets


def legacy_logprobs(tokens: list[Scored], k: int, offset: int = 0) -> dict:
    """OpenAI's legacy `logprobs` object for these tokens, offsets counted from `offset`.

    `top_logprobs` keys are token texts, so two ids that spell the same text (byte pieces
    shown as U+FFFD) share a key; the larger log-probability is kept, so the dict's maximum is
    always the true top-1 — lm-evaluation-harness decides `is_greedy` by comparing that
    maximum with the token's own log-probability, exactly (openai_completions.py)."""
    _, offsets = spelled(tokens)
    tops: list[dict[str, float] | None] = []
    for token in tokens:
        if token.logprob is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for raw, logprob in token.top[:k]:
            key = token_text(raw)
            top[key] = max(top.get(key, logprob), logprob)
        tops.append(top)
    return {"tokens": [token_text(t.raw) for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": tops, "text_offset": [offset + o for o in offsets]}

