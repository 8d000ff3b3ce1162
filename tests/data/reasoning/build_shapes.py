"""Writes the vLLM and Ollama response bodies of tests/data/reasoning/ (`vllm-*`, `ollama-*`).

No reasoning server of either runs here (no GPU, no hub), so these are not recordings: each body
is assembled field by field from the servers' own source, as cited in each file's `_provenance`
(and next to each field below), with token values taken from the tiny test vocabulary so that
the `openai` teacher can map them. Run from the repository root:

    PYTHONPATH=src:tests python tests/data/reasoning/build_shapes.py

Sources (read 2026-11-30):
- vLLM `vllm/entrypoints/openai/chat_completion/serving.py`: `chat_completion_full_generator`
  builds `logprobs` from ALL generated token ids (`_create_chat_logprobs(token_ids=output.token_ids)`)
  before the reasoning parser splits the text, so the list runs trace, `</think>`, answer; entries
  carry `token`, `logprob` (max(lp, -9999.0)), `bytes` (the decoded token's UTF-8) and
  `top_logprobs`, no `id`. `vllm/reasoning/basic_parsers.py` `BaseThinkingReasoningParser`:
  `reasoning, _, content = partition("</think>")`, no stripping, `content or None`.
  PR vllm-project/vllm#27752 (0.11.1): the field is `reasoning` (`reasoning_content` before, and
  kept as an alias until PR #33402, Jan 2026). Streaming: a chunk with `"delta": {}` still carries
  the logprobs of a token the parser held back ("we still need to send a chunk ... to ensure all
  tokens are included"). `usage.completion_tokens_details` is null on chat completions through
  0.25.x (issue #50895). gpt-oss (`openai_gptoss` parser): analysis channel = reasoning, final =
  content; logprobs start with `<|channel|>`, `analysis`, `<|message|>`.
- Ollama `openai/openai.go` (`ToChatCompletion`, `ToChunk`): `message.reasoning` (from the native
  `thinking`), `content`; `logprobs.content` entries `{token, logprob, bytes, top_logprobs}` with
  no id (api.Logprob), thinking tokens then content tokens, tags not listed (its parser strips
  them from the text); before v0.12.11 `logprobs` is absent. Streamed: `delta.reasoning`, every
  chunk with `role: assistant` and `content` ("" on thinking chunks); usage without a breakdown.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from conftest import build_tiny_harmony_tokenizer, build_tiny_think_tokenizer

from edgedistill.models.vocab import VocabMap

HERE = Path(__file__).parent
TRACE = "Two plus three. That is five.\n"
ANSWER = "\n\nThe answer is 5."


def entries(tokenizer, text: str, vocab: VocabMap, start: int = 0) -> list[dict]:
    """vLLM/Ollama logprob entries of `text` as the tokenizer splits it: the chosen token first in
    its top list, then one other token; log-probs a fixed pattern (illustrative values)."""
    out = []
    for i, token in enumerate(tokenizer(text, add_special_tokens=False)["input_ids"]):
        other = 40 + (token * 7 + i) % 300  # an ordinary token of the tiny vocabulary
        lp = -0.05 * (1 + (start + i) % 4)
        out.append({"token": vocab.id_bytes[token].decode("utf-8", "replace"), "logprob": lp,
                    "bytes": list(vocab.id_bytes[token]),
                    "top_logprobs": [{"token": vocab.id_bytes[token].decode("utf-8", "replace"), "logprob": lp,
                                      "bytes": list(vocab.id_bytes[token])},
                                     {"token": vocab.id_bytes[other].decode("utf-8", "replace"), "logprob": -3.5,
                                      "bytes": list(vocab.id_bytes[other])}]})
    return out


def write(name: str, provenance: str, response: dict) -> None:
    (HERE / name).write_text(json.dumps({"_provenance": provenance, "response": response}, ensure_ascii=False,
                                        indent=1) + "\n", encoding="utf-8")


def write_sse(name: str, provenance: str, chunks: list[dict]) -> None:
    header = "".join(f": {line}\n" for line in textwrap.wrap(provenance, 110))
    body = "".join(f"data: {json.dumps(c, ensure_ascii=False)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    (HERE / name).write_text(header + "\n" + body, encoding="utf-8")


def vllm_body(model: str, message: dict, logprobs: list[dict], finish: str, completion_tokens: int) -> dict:
    return {"id": "chatcmpl-8d0c1f", "object": "chat.completion", "created": 1767225600, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "refusal": None, "annotations": None,
                                                 "audio": None, "function_call": None, "tool_calls": [], **message},
                         "logprobs": {"content": logprobs}, "finish_reason": finish, "stop_reason": None}],
            "service_tier": None, "system_fingerprint": None,
            "usage": {"prompt_tokens": 12, "total_tokens": 12 + completion_tokens,
                      "completion_tokens": completion_tokens, "prompt_tokens_details": None},
            "prompt_logprobs": None, "kv_transfer_params": None}


def main() -> None:
    think = build_tiny_think_tokenizer("r1")
    vocab = VocabMap(think)
    trace = entries(think, TRACE, vocab)
    end = entries(think, "</think>", vocab, len(trace))
    answer = entries(think, ANSWER, vocab, len(trace) + 1)
    r1 = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    source = ("Built from vLLM's source (not recorded; see tests/data/reasoning/build_shapes.py for the files "
              "and lines), token values from the tiny test vocabulary (build_tiny_think_tokenizer('r1')). ")
    write("vllm-r1.json", source + "vLLM >= 0.16 with --reasoning-parser deepseek_r1, R1 distill (the prompt opens "
          "the trace): `reasoning` is the text before </think> (trailing newline kept), `content` the text after "
          "it (leading blank line kept); logprobs.content lists trace, </think>, answer in generation order.",
          vllm_body(r1, {"content": ANSWER, "reasoning": TRACE}, trace + end + answer, "stop",
                    len(trace) + len(end) + len(answer)))
    write("vllm-r1-0.10.json", source + "vLLM 0.10.x-0.11.0: the same body with the field named "
          "`reasoning_content`.",
          vllm_body(r1, {"content": ANSWER, "reasoning_content": TRACE}, trace + end + answer, "stop",
                    len(trace) + len(end) + len(answer)))
    cut = entries(think, "Two plus three.", vocab)
    write("vllm-r1-length.json", source + "The trace hit max_tokens: the parser found no </think>, so everything "
          "is reasoning and `content` is null (`content or None`), finish_reason length.",
          vllm_body(r1, {"content": None, "reasoning": "Two plus three."}, cut, "length", len(cut)))
    delta_chunks = [{"id": "chatcmpl-8d0c1f", "object": "chat.completion.chunk", "created": 1767225600, "model": r1,
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]}]
    for kind, items in (("reasoning", trace), (None, end), ("content", answer)):
        for i, entry in enumerate(items):
            delta = {} if kind is None else {kind: bytes(entry["bytes"]).decode("utf-8", "replace")}
            last = kind == "content" and i == len(items) - 1
            delta_chunks.append({"id": "chatcmpl-8d0c1f", "object": "chat.completion.chunk", "created": 1767225600,
                                 "model": r1, "choices": [{"index": 0, "delta": delta,
                                                           "logprobs": {"content": [entry]},
                                                           "finish_reason": "stop" if last else None,
                                                           **({"stop_reason": None} if last else {})}]})
    n = len(trace) + len(end) + len(answer)
    delta_chunks.append({"id": "chatcmpl-8d0c1f", "object": "chat.completion.chunk", "created": 1767225600,
                         "model": r1, "choices": [], "usage": {"prompt_tokens": 12, "total_tokens": 12 + n,
                                                               "completion_tokens": n}})
    write_sse("vllm-r1-stream.sse", source + "Streamed (stream: true, logprobs: true, stream_options.include_usage): "
              "one token per chunk; `delta.reasoning` for the trace, `delta: {}` with the logprobs of </think>, "
              "`delta.content` for the answer, then a usage chunk with no choices.", delta_chunks)

    harmony = build_tiny_harmony_tokenizer()
    hvocab = VocabMap(harmony)
    head = entries(harmony, "<|channel|>analysis<|message|>", hvocab)
    htrace = entries(harmony, "User asks 2+3. Answer 5.", hvocab, len(head))
    switch = entries(harmony, "<|end|><|start|>assistant<|channel|>final<|message|>", hvocab)
    final = entries(harmony, "5", hvocab)
    write("vllm-gptoss.json", "Built from vLLM's source (see build_shapes.py), token values from the tiny harmony "
          "vocabulary (build_tiny_harmony_tokenizer). gpt-oss-20b with the openai_gptoss parser: the analysis channel "
          "is `reasoning`, the final channel `content`; logprobs.content covers the channel markers too, special "
          "tokens written as their text.",
          vllm_body("openai/gpt-oss-20b", {"content": "5", "reasoning": "User asks 2+3. Answer 5."},
                    head + htrace + switch + final, "stop", len(head + htrace + switch + final)))

    ollama_source = ("Built from Ollama's source (openai/openai.go ToChatCompletion/ToChunk, api.Logprob; not "
                     "recorded, see build_shapes.py), token values from the tiny test vocabulary. ")
    o_trace = entries(think, "Two plus three. That is five.", vocab)
    o_answer = entries(think, "The answer is 5.", vocab, len(o_trace))
    ollama = {"id": "chatcmpl-412", "object": "chat.completion", "created": 1767225600, "model": "qwen3:8b",
              "system_fingerprint": "fp_ollama",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "The answer is 5.",
                                                   "reasoning": "Two plus three. That is five."},
                           "finish_reason": "stop", "logprobs": {"content": o_trace + o_answer}}],
              "usage": {"prompt_tokens": 15, "completion_tokens": len(o_trace + o_answer),
                        "total_tokens": 15 + len(o_trace + o_answer)}}
    write("ollama-qwen3.json", ollama_source + "Ollama >= 0.12.11 /v1/chat/completions with a thinking model: "
          "`message.reasoning` (never reasoning_content), logprobs without ids, the thinking tokens then the answer "
          "tokens with the tags left out (its parser strips them).", ollama)
    old = json.loads(json.dumps(ollama))
    del old["choices"][0]["logprobs"]
    write("ollama-qwen3-nologprobs.json", ollama_source + "Ollama before 0.12.11: `logprobs: true` is accepted and "
          "ignored, the body has no logprobs at all.", old)
    chunks = []
    for entry in o_trace:
        piece = bytes(entry["bytes"]).decode("utf-8", "replace")
        chunks.append({"id": "chatcmpl-412", "object": "chat.completion.chunk", "created": 1767225600,
                       "model": "qwen3:8b", "system_fingerprint": "fp_ollama",
                       "choices": [{"index": 0, "delta": {"role": "assistant", "content": "", "reasoning": piece},
                                    "finish_reason": None, "logprobs": {"content": [entry]}}]})
    for entry in o_answer:
        piece = bytes(entry["bytes"]).decode("utf-8", "replace")
        chunks.append({"id": "chatcmpl-412", "object": "chat.completion.chunk", "created": 1767225600,
                       "model": "qwen3:8b", "system_fingerprint": "fp_ollama",
                       "choices": [{"index": 0, "delta": {"role": "assistant", "content": piece},
                                    "finish_reason": None, "logprobs": {"content": [entry]}}]})
    chunks.append({"id": "chatcmpl-412", "object": "chat.completion.chunk", "created": 1767225601,
                   "model": "qwen3:8b", "system_fingerprint": "fp_ollama",
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": "stop"}]})
    write_sse("ollama-qwen3-stream.sse", ollama_source + "Streamed: `delta.reasoning` on thinking chunks (with "
              "content \"\"), `delta.content` after, role on every chunk, the last chunk empty with finish_reason "
              "stop; no usage chunk.", chunks)


if __name__ == "__main__":
    main()
