"""Check a GGUF in the llama.cpp runtime against the transformers model it came from, and
measure quantised files against the highest-precision one — verified, not assumed.

Everything goes through llama.cpp's own server (models/llamacpp.py): `/tokenize` and
`/apply-template` for the tokenizer and chat template, `/completion` with token-id prompts,
greedy decoding and `n_probs` for tokens and log-probabilities (natural logs over the whole
vocabulary, from the raw logits). Quality of a quantised file is measured teacher-forced on
held-out text, one request per position with llama.cpp's prompt cache (each request adds one
token): KL(reference ‖ quant) on the reference's top-k plus one tail bucket — the same sparse
form the KD losses use — and top-1 agreement. llama.cpp drops the probabilities of a position
whose argmax token ends inside a UTF-8 character; such positions are skipped and counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np

from edgedistill.models.llamacpp import LlamaCppServer, start_llamacpp_server
from edgedistill.models.vocab import VocabMap
from edgedistill.recipe import TOP_LOGPROBS_CAP

if TYPE_CHECKING:
    import torch

PROBE_TEXT = ("Distil a model for the edge: 価格は ¥12,800（税込）です。 Ship it on 2026-11-28 🙂 — "
              "naïve café, ＡＢＣ１２３, 東京都千代田区 〒100-0001.")
N_PROBS = 64   # what each side lists per position; a reference id outside the quant's list is
               # given the quant's smallest listed log-prob (an upper bound), and counted


class LlamaCppClient:
    """`slots`: the server's parallel slots (how many of `complete_many`'s prompts decode together)."""

    def __init__(self, server: LlamaCppServer, timeout_s: float = 300.0, slots: int = 1):
        self.http = httpx.Client(base_url=f"http://{server.host}:{server.port}", timeout=timeout_s, trust_env=False)
        self.slots = slots

    def close(self) -> None:
        self.http.close()

    def _post(self, path: str, body: dict):
        response = self.http.post(path, json=body)
        response.raise_for_status()
        return response.json()

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return self._post("/tokenize", {"content": text, "add_special": add_special, "parse_special": False})["tokens"]

    def apply_template(self, messages: list[dict[str, str]]) -> str:
        return self._post("/apply-template", {"messages": messages})["prompt"]

    def complete(self, prompt_ids: list[int], n_predict: int, n_probs: int = 0, ignore_eos: bool = False,
                 cache_prompt: bool = True) -> dict:
        return self._post("/completion", {
            "prompt": prompt_ids, "n_predict": n_predict, "temperature": 0.0, "n_probs": n_probs,
            "return_tokens": True, "cache_prompt": cache_prompt, "ignore_eos": ignore_eos})

    def complete_many(self, prompts: list[list[int]], n_predict: int) -> list[dict]:
        """Greedy replies to many prompts, all in one request: llama.cpp queues them and keeps its
        `slots` decoding together, starting the next prompt in a slot as soon as one finishes
        (continuous batching), and a slot reuses the start its last prompt shares with the next
        (the chat template's system turn). bench/export_checks.py, the demo's q8_0 file on one
        thread (docs/BENCHMARKS.md): 26 held-out answers at 4 slots, 4 prompts per request as
        before, vs 8 slots, one request. A batch's rounding differs from a lone request's, so a
        few greedy answers part from the one-at-a-time ones at near-ties; runs repeat exactly."""
        if not prompts:
            return []
        out = self._post("/completion", {"prompt": prompts if len(prompts) > 1 else prompts[0], "n_predict": n_predict,
                                         "temperature": 0.0, "return_tokens": True, "cache_prompt": True})
        return sorted(out, key=lambda r: r.get("index", 0)) if isinstance(out, list) else [out]


@dataclass
class Parity:
    tokenizer_match: bool
    template_match: bool
    greedy_match: int  # prompts whose greedy tokens are identical
    # Prompts whose greedy paths part where transformers ranks the two tokens closer than twice
    # max_logprob_diff. Where llama.cpp lists that position, both tokens are among its entries,
    # so a split that rounding alone causes lands here; a conversion error shows as a wide gap.
    near_tie_splits: int
    prompts: int
    compared_positions: int
    max_logprob_diff: float  # over the top entries llama.cpp lists, vs transformers on the same tokens
    first_difference: str  # a human-readable note on the first mismatch, "" if none

    def as_metrics(self) -> dict[str, float]:
        return {"tokenizer_match": float(self.tokenizer_match), "template_match": float(self.template_match),
                "greedy_match": self.greedy_match, "greedy_near_ties": self.near_tie_splits,
                "greedy_prompts": self.prompts,
                "compared_positions": self.compared_positions, "max_logprob_diff": self.max_logprob_diff}


def _position_of(tokens: list[int], entries: list[dict], id_bytes: dict[int, bytes]) -> list[tuple[int, dict]]:
    """Align llama.cpp's per-token probability entries with generated positions.

    llama.cpp emits no entry for a token that ends inside a UTF-8 character (by its own test of
    lead bytes, which e.g. takes a lone 0xC1 byte token as the start of a character) and hands
    its bytes to the next entry. So each entry covers the tokens whose bytes it carries and
    belongs to the last of them; special tokens come back with no bytes and cover one token.
    Alignment stops at the first entry that does not fit, rather than pair log-probs by guess."""
    aligned, position = [], 0
    for entry in entries:
        raw = bytes(entry.get("bytes") or [])
        start, covered = position, b""
        while position < len(tokens) and (position == start or len(covered) < len(raw)):
            covered += id_bytes.get(tokens[position], b"")
            position += 1
        last = position - 1
        if position == start or tokens[last] != entry.get("id") or (raw and covered != raw):
            break
        aligned.append((last, entry))
    return aligned


def check_parity(client: LlamaCppClient, model, tokenizer, conversations: list[list[dict[str, str]]],
                 max_new_tokens: int = 16, n_probs: int = 5) -> Parity:
    """Tokenizer, chat template, greedy tokens and log-probs of the GGUF (or .pte) vs transformers:
    one transformers forward pass per prompt, along the runtime's own greedy tokens."""
    import torch

    from edgedistill.models.hf import encode_prompts, end_of_turn_ids

    notes: list[str] = []
    hf_ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    gguf_ids = client.tokenize(PROBE_TEXT)
    if hf_ids != gguf_ids:
        at = next(i for i, (a, b) in enumerate(zip(hf_ids + [-1], gguf_ids + [-1])) if a != b)
        notes.append(f"tokenizer differs at token {at}: transformers {hf_ids[at:at + 3]} vs llama.cpp {gguf_ids[at:at + 3]}")
    template_match = all(_same_prompt(client, tokenizer, m) for m in conversations)
    if not template_match:
        notes.append("chat template renders differently")
    greedy_match, compared, max_diff, split_gaps = 0, 0, 0.0, []
    eos = tokenizer.eos_token_id
    ends = end_of_turn_ids(model, tokenizer) | {eos}
    id_bytes = VocabMap(tokenizer).id_bytes
    for prompt in encode_prompts(tokenizer, conversations):
        answer = client.complete(prompt, max_new_tokens, n_probs)
        tokens = answer.get("tokens") or []
        with torch.inference_mode():
            # transformers' log-probs along llama.cpp's own tokens, plus the position after the last one
            logprobs = torch.log_softmax(model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:].float(), -1)
        reference = greedy_along(tokens, logprobs, ends, max_new_tokens)
        # a finished answer ends in an end-of-turn token: transformers keeps it, llama.cpp builds
        # differ on returning it (xllamacpp 2026.10 does) — compare the answers without it
        if _without_end(reference, ends) == _without_end(tokens, ends):
            greedy_match += 1
        else:
            at, gap = _greedy_split(reference, tokens, logprobs, eos)
            split_gaps.append(gap)
            notes.append(f"greedy tokens differ at step {at} (transformers' log-prob gap there {gap:.4f})")
        for position, entry in _position_of(tokens, answer.get("completion_probabilities") or [], id_bytes):
            for top in entry.get("top_logprobs", []):
                max_diff = max(max_diff, abs(float(logprobs[position, top["id"]]) - float(top["logprob"])))
                compared += 1
    near_ties = sum(gap <= 2 * max_diff for gap in split_gaps)
    return Parity(hf_ids == gguf_ids, template_match, greedy_match, near_ties, len(conversations), compared,
                  max_diff, notes[0] if notes else "")


def greedy_along(tokens: list[int], logprobs: torch.Tensor, ends: set[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy answer, read off one forward pass along the runtime's `tokens`
    (`logprobs`: a row per token plus one after the last): greedy decoding takes the argmax given
    the prefix, and until the two paths part the prefix is the runtime's, so the argmax at each
    position is what `generate()` would pick. It stops at an end-of-turn token, at max_new_tokens,
    or where it parts from `tokens` (what follows a split is not needed: `_greedy_split`). This
    replaced a generate() per prompt, slow on the .pte's 8da4w reference in eager torchao: the
    demo's .pte build spent 41 s instead of 79 s beyond export and lowering (docs/BENCHMARKS.md)."""
    reference: list[int] = []
    for position in range(min(len(tokens) + 1, max_new_tokens)):
        choice = int(logprobs[position].argmax())
        reference.append(choice)
        if choice in ends or position >= len(tokens) or choice != tokens[position]:
            break
    return reference


def _without_end(tokens: list[int], ends: set[int]) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] in ends else tokens


def _same_prompt(client: LlamaCppClient, tokenizer, messages: list[dict[str, str]]) -> bool:
    """The chat template renders the same prompt in both runtimes. A template that starts with
    the BOS token (Gemma's) is rendered without it by llama.cpp when the model adds BOS itself
    at tokenisation: the same tokens, so the same prompt."""
    ours = client.apply_template(messages)
    theirs = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if ours == theirs:
        return True
    bos = tokenizer.bos_token
    return bool(bos) and theirs == bos + ours and client.tokenize("", add_special=True) == [tokenizer.bos_token_id]


def _greedy_split(reference: list[int], tokens: list[int], logprobs: torch.Tensor, eos: int) -> tuple[int, float]:
    """Where two greedy paths part, and how far transformers ranks its own choice there above
    llama.cpp's (a path that ended chose the end-of-turn token). `logprobs` follows llama.cpp's path."""
    at = next((i for i, (a, b) in enumerate(zip(reference, tokens)) if a != b), min(len(reference), len(tokens)))
    ours = reference[at] if at < len(reference) else eos
    theirs = tokens[at] if at < len(tokens) else eos
    return at, float(logprobs[at, ours] - logprobs[at, theirs])


@dataclass
class Distributions:
    """Per evaluated position, the listed ids and log-probs (None where llama.cpp gave none)."""

    rows: list[tuple[np.ndarray, np.ndarray] | None]


def teacher_forced(client: LlamaCppClient, sequences: list[list[int]], max_positions: int,
                   n_probs: int = N_PROBS) -> Distributions:
    """Next-token distributions at every position of the sequences (after the first token)."""
    rows: list[tuple[np.ndarray, np.ndarray] | None] = []
    for sequence in sequences:
        for end in range(1, len(sequence)):
            if len(rows) >= max_positions:
                return Distributions(rows)
            probs = client.complete(sequence[:end], 1, n_probs).get("completion_probabilities") or []
            top = probs[0].get("top_logprobs") if probs else None
            rows.append((np.array([t["id"] for t in top]), np.array([t["logprob"] for t in top], dtype=np.float64))
                        if top else None)
    return Distributions(rows)


def sparse_kl_top1(reference: Distributions, quant: Distributions, k: int = TOP_LOGPROBS_CAP) -> dict[str, float]:
    """Mean KL(reference ‖ quant) over reference top-k + tail, top-1 agreement, and coverage."""
    kls, agree, missing, used = [], 0, 0, 0
    for ref, qnt in zip(reference.rows, quant.rows):
        if ref is None or qnt is None:
            continue
        used += 1
        ref_ids, ref_lp = ref[0][:k], ref[1][:k]
        lookup = dict(zip(qnt[0].tolist(), qnt[1].tolist()))
        floor = float(qnt[1].min())
        q_lp = np.array([lookup.get(i, floor) for i in ref_ids.tolist()])
        missing += sum(i not in lookup for i in ref_ids.tolist())
        p_tail = max(1.0 - float(np.exp(ref_lp).sum()), 1e-12)
        q_tail = max(1.0 - float(np.exp(q_lp).sum()), 1e-12)
        p = np.exp(ref_lp)
        kls.append(float((p * (ref_lp - q_lp)).sum()) + p_tail * (math.log(p_tail) - math.log(q_tail)))
        agree += int(ref[0][0] == qnt[0][0])
    return {"kl_vs_reference": float(np.mean(kls)) if kls else float("nan"),
            "top1_vs_reference": agree / used if used else float("nan"),
            "kl_positions": used, "kl_positions_skipped": len(reference.rows) - used,
            "kl_ids_outside_quant_list": missing}


def speed(client: LlamaCppClient, prompt_ids: list[int], n_predict: int) -> dict[str, float]:
    """Prefill and decode tokens/s from llama.cpp's own timings (second run: warm, no prompt cache)."""
    timings = {}
    for _ in range(2):
        timings = client.complete(prompt_ids, n_predict, ignore_eos=True, cache_prompt=False).get("timings", {})
    return {"prefill_tokens_per_s": float(timings.get("prompt_per_second", 0.0)),
            "decode_tokens_per_s": float(timings.get("predicted_per_second", 0.0))}


def greedy_completions(client, prompts: list[list[int]], n_predict: int) -> list[dict]:
    """The runtime's raw greedy replies to chat prompts (token ids): what every answering check of
    a file (held-out answers, audit, thinking on/off) is built on. Batched on a llama.cpp server
    with several slots (`LlamaCppClient.complete_many`), else one by one with no prompt cache
    (their timings are one user's time to first token)."""
    if getattr(client, "slots", 1) > 1:
        return client.complete_many(prompts, n_predict)
    return [client.complete(prompt_ids, n_predict, cache_prompt=False) for prompt_ids in prompts]


def greedy_answers(client, prompts: list[list[int]], n_predict: int) -> tuple[list[str], float]:
    """The file's greedy answers to chat prompts (token ids), and the mean time to first token
    (prompt evaluation + one decoded token, the runtime's own timings, no prompt cache) — NaN on
    a server with several slots, whose batched timings are not one user's."""
    answers, first_token = [], []
    for out in greedy_completions(client, prompts, n_predict):
        answers.append(str(out.get("content", "")).strip())
        t = out.get("timings", {})
        if t.get("predicted_n"):
            first_token.append((t.get("prompt_ms", 0.0) + t.get("predicted_ms", 0.0) / t["predicted_n"]) / 1000)
    alone = getattr(client, "slots", 1) == 1
    return answers, sum(first_token) / len(first_token) if first_token and alone else float("nan")


def serve(gguf_path: Path, threads: int = 2, ctx: int = 4096, exact: bool = False, slots: int = 1
          ) -> LlamaCppServer:
    return start_llamacpp_server(gguf_path, parallel=slots, ctx_per_slot=ctx, threads=threads, alias=gguf_path.stem,
                                 exact=exact)
