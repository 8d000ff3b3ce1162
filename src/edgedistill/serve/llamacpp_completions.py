"""Legacy `/v1/completions` on the llama.cpp engine, assembled in the front.

Why not forward to llama.cpp's own `/v1/completions`: its answer has the chat layout
(`logprobs.content`), it accepts `echo` and ignores it, and its server has no prompt
log-probabilities at all (upstream issue ggml-org/llama.cpp#27174 open; PR #15189 open,
#17935 closed unmerged). So the front generates through the native `/completion` (token ids
in, `return_tokens`, `n_probs`) and computes what llama.cpp cannot give by asking the engine
itself, one position at a time:

  for position i, POST /completion {prompt: ids[:i], n_predict: 1, temperature: 0,
  n_probs: k, logit_bias: [[ids[i], +1000]], cache_prompt, id_slot: pinned}

The bias forces the draw but not the reported numbers: llama.cpp reports the drawn token's
log-probability looked up over the whole vocabulary from the raw logits, and the top-k from
the same softmax (measured on an F32 GGUF in exact mode against transformers: max |delta|
3.7e-6, the same top-3 ids at every position; /tmp/research/r22). The slot's prompt cache
holds ids[:i-1], so each position costs one decode step. Where the forced token leaves the
text inside a UTF-8 character llama.cpp sends no entry; then a token that spells plain text is
forced instead and the target is read from the list (top-k first, the whole vocabulary if
needed).

Each scored position is remembered under a hash of its prefix, so lm-evaluation-harness's
context + choice requests score the shared context once.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import httpx
from prometheus_client import Counter

from edgedistill.serve.wire import Scored, legacy_logprobs, prompt_list, spelled

# Fields llama.cpp's native /completion does not share with the OpenAI request; the rest
# (temperature, top_p, stop, seed, logit_bias, penalties, llama.cpp's own extras) pass as they are.
OPENAI_ONLY = {"model", "prompt", "max_tokens", "logprobs", "echo", "n", "best_of", "suffix", "user", "stream",
               "stream_options"}
FORCE = 1000.0  # logit bias that makes the target the draw at temperature 0


class UpstreamError(Exception):
    """llama.cpp refused the request (status 400) or answered something unreadable (502)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Position:
    """A scored prompt position: the target's log-probability and the top ids at that point."""

    k: int  # how many alternatives were asked for
    logprob: float
    top: list[tuple[int, float]]


def prefix_keys(ids: list[int]) -> list[bytes]:
    """keys[i] identifies ids[:i + 1] (a hash chain: O(1) memory per position)."""
    keys, key = [], b""
    for token in ids:
        key = hashlib.blake2b(key + token.to_bytes(4, "little"), digest_size=16).digest()
        keys.append(key)
    return keys


class LlamaCppCompletions:
    """Legacy completions through one llama.cpp server with `slots` parallel slots."""

    def __init__(self, client: httpx.AsyncClient, slots: int, positions: Counter, cache_positions: int = 50_000):
        self.client = client
        self.positions = positions  # labelled by source: engine (one request), cache, fallback (a list read)
        self.free_slots: asyncio.Queue[int] = asyncio.Queue()
        for slot in range(slots):
            self.free_slots.put_nowait(slot)
        self.cache: OrderedDict[bytes, Position] = OrderedDict()
        self.cache_positions = cache_positions
        self.pieces: dict[int, bytes] = {}  # token id -> the bytes it spells
        self.vocab: tuple[int, int] | None = None  # (n_vocab, a token spelling plain text)

    # ---- upstream -------------------------------------------------------------------------------
    async def _post(self, path: str, body: dict) -> dict:
        response = await self.client.post(path, json=body)
        try:
            data = response.json()
        except ValueError:
            raise UpstreamError(502, "The model runtime sent a broken answer.") from None
        if response.status_code >= 400:
            error = data.get("error") if isinstance(data, dict) else None
            message = error.get("message", "Request rejected.") if isinstance(error, dict) else "Request rejected."
            raise UpstreamError(400 if response.status_code < 500 else 502, message)
        return data

    async def _tokenize(self, text: str) -> list[int]:
        """As llama.cpp's /v1/completions tokenizes a string prompt (special tokens added and parsed)."""
        data = await self._post("/tokenize", {"content": text, "add_special": True, "parse_special": True})
        return data["tokens"]

    async def _vocabulary(self) -> tuple[int, int]:
        """(n_vocab, a token spelling plain text). On first use also every token's bytes, from one
        whole-vocabulary list: a token-id prompt brings no text, and a byte piece detokenized
        alone is only U+FFFD."""
        if self.vocab is None:
            models = await self.client.get("/v1/models")
            n_vocab = int(models.json()["data"][0]["meta"]["n_vocab"])
            plain = (await self._tokenize("a"))[-1]
            listed = await self._post("/completion", {"prompt": [plain], "n_predict": 1, "temperature": 0,
                                                      "n_probs": n_vocab, "logit_bias": [[plain, FORCE]]})
            for token in listed["completion_probabilities"][0]["top_logprobs"]:
                if token.get("bytes"):  # special tokens list no bytes: their text comes from /detokenize
                    self.pieces[token["id"]] = bytes(token["bytes"])
            self.vocab = (n_vocab, plain)
        return self.vocab

    async def _piece(self, token: int) -> bytes:
        await self._vocabulary()
        if token not in self.pieces:
            data = await self._post("/detokenize", {"tokens": [token]})
            self.pieces[token] = data["content"].encode()
        return self.pieces[token]

    async def _forced(self, prefix: list[int], token: int, n_probs: int, slot: int) -> dict | None:
        """The entry of `token` drawn after `prefix`, or None when llama.cpp sent none."""
        data = await self._post("/completion", {
            "prompt": prefix, "n_predict": 1, "temperature": 0, "n_probs": n_probs, "cache_prompt": True,
            "id_slot": slot, "logit_bias": [[token, FORCE]], "return_tokens": True})
        probs = data.get("completion_probabilities") or []
        return probs[0] if probs and probs[0].get("id") == token else None

    async def _position(self, prefix: list[int], target: int, k: int, slot: int) -> Position:
        n_probs = max(k, 1)
        entry = await self._forced(prefix, target, n_probs, slot)
        if entry is not None:
            logprob = entry["logprob"]
            top = [(t["id"], t["logprob"]) for t in entry["top_logprobs"]]
        else:  # the target ends inside a UTF-8 character: read it from a list instead
            self.positions.labels("fallback").inc()
            n_vocab, plain = await self._vocabulary()
            for size in (n_probs, n_vocab):
                entry = await self._forced(prefix, plain, size, slot)
                if entry is None:
                    raise UpstreamError(502, "The model runtime gave no log-probabilities.")
                table = {t["id"]: t["logprob"] for t in entry["top_logprobs"]}
                if target in table:
                    break
            else:
                raise UpstreamError(502, f"The model runtime did not list token {target}.")
            logprob = table[target]
            top = [(t["id"], t["logprob"]) for t in entry["top_logprobs"][:n_probs]]
        # The listed float where the target is listed: is_greedy in lm-eval is an exact comparison.
        return Position(k, dict(top).get(target, logprob), top)

    # ---- scoring --------------------------------------------------------------------------------
    async def score(self, ids: list[int], k: int, slot: int, start: int = 0) -> list[Scored]:
        """Each token of `ids` from `start` on with its log-probability given the ones before it
        (None for the first token) and its top-k, through the engine on a pinned slot."""
        keys = prefix_keys(ids)
        out = []
        for i in range(start, len(ids)):
            if i == 0:
                out.append(Scored(await self._piece(ids[0]), None, []))
                continue
            position = self.cache.get(keys[i])
            self.positions.labels("cache" if position is not None and position.k >= k else "engine").inc()
            if position is None or position.k < k:
                position = await self._position(ids[:i], ids[i], k, slot)
                self.cache[keys[i]] = position
                if len(self.cache) > self.cache_positions:
                    self.cache.popitem(last=False)
            self.cache.move_to_end(keys[i])
            top = [(await self._piece(t), lp) for t, lp in position.top[:k]]
            out.append(Scored(await self._piece(ids[i]), position.logprob, top))
        return out

    async def _generated(self, ids: list[int], tokens: list[int], entries: list[dict], k: int,
                         slot: int) -> list[Scored]:
        """The generated tokens' entries; llama.cpp leaves out a token that ends inside a UTF-8
        character, and then every position is scored (the entries cannot be aligned safely)."""
        if len(entries) != len(tokens) or any(e.get("id") != t for e, t in zip(entries, tokens)):
            return await self.score(ids + tokens, k, slot, start=len(ids))
        out = []
        for entry in entries:
            top = [(t["id"], t["logprob"]) for t in entry["top_logprobs"]]
            logprob = dict(top).get(entry["id"], entry["logprob"])
            out.append(Scored(await self._piece(entry["id"]), logprob,
                              [(await self._piece(t), lp) for t, lp in top[:k]]))
        return out

    # ---- the request ----------------------------------------------------------------------------
    async def _choice(self, index: int, ids: list[int], body: dict, slot: int) -> tuple[dict, int]:
        k, max_tokens = body.get("logprobs"), body.get("max_tokens")
        echoed: list[Scored] = []
        echo_text = ""
        if body.get("echo"):
            if k is None:
                echo_text = (await self._post("/detokenize", {"tokens": ids}))["content"]
            else:
                echoed = await self.score(ids, k, slot)
                echo_text = spelled(echoed)[0]
        text, finish, tokens, generated = "", "length", [], []
        if max_tokens != 0:
            native = {key: value for key, value in body.items() if key not in OPENAI_ONLY}
            native.update(prompt=ids, n_probs=0 if k is None else max(k, 1), return_tokens=True, cache_prompt=True,
                          id_slot=slot, stream=False)
            if max_tokens is not None:
                native["n_predict"] = max_tokens
            result = await self._post("/completion", native)
            text, tokens = result.get("content", ""), result.get("tokens") or []
            finish = "length" if result.get("stop_type") == "limit" else "stop"
            if k is not None:
                generated = await self._generated(ids, tokens, result.get("completion_probabilities") or [], k, slot)
        logprobs = None if k is None else legacy_logprobs(echoed + generated, k)
        return {"index": index, "text": echo_text + text, "finish_reason": finish, "logprobs": logprobs}, len(tokens)

    async def complete(self, body: dict, model_id: str) -> dict:
        """The whole legacy answer: one choice per prompt, in order. Raises UpstreamError."""
        slot = await self.free_slots.get()
        try:
            choices, prompt_tokens, completion_tokens = [], 0, 0
            for index, prompt in enumerate(prompt_list(body["prompt"])):
                ids = prompt if isinstance(prompt, list) else await self._tokenize(prompt)
                choice, generated = await self._choice(index, ids, body, slot)
                choices.append(choice)
                prompt_tokens += len(ids)
                completion_tokens += generated
        finally:
            self.free_slots.put_nowait(slot)
        return {"id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion", "created": int(time.time()),
                "model": model_id, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}


def legacy_chunk(chunk: dict, k: int, offsets: dict[int, int]) -> dict:
    """A streamed llama.cpp completion chunk with its `logprobs.content` in the legacy layout;
    `offsets` carries each choice's text length across chunks."""
    for choice in chunk.get("choices") or []:
        index = choice.get("index", 0)
        content = (choice.get("logprobs") or {}).get("content")
        if content is not None:
            tokens = [Scored(bytes(e.get("bytes") or b"") or e.get("token", "").encode(), e["logprob"],
                             [(bytes(t.get("bytes") or b"") or t.get("token", "").encode(), t["logprob"])
                              for t in e.get("top_logprobs", [])]) for e in content]
            choice["logprobs"] = legacy_logprobs(tokens, k, offsets.get(index, 0))
        offsets[index] = offsets.get(index, 0) + len(choice.get("text") or "")
    return chunk
