"""Reasoning teachers on the wire: what vLLM, llama.cpp and Ollama send back (tests/data/reasoning/,
each file saying where it comes from) replayed by a real HTTP server on 127.0.0.1 to the `openai`
teacher — the trace stored apart from the answer, each with its own top-k rows; null content
accepted; streamed bodies put back together; servers without log-probs kept as text."""

from __future__ import annotations

import json

import numpy as np
import pytest
from replayserver import FIXTURES, ReplayServer

from edgedistill.models.hf import load_tokenizer
from edgedistill.recipe import GenerateCfg, TeacherCfg
from edgedistill.teachers.openai_compat import (
    OpenAITeacher,
    parse_chat_response,
    parse_chat_stream,
)

QUESTION = [{"role": "user", "content": "What is 2+3?"}]


def ask(base_url: str, tokenizer: str, k: int = 2, **teacher) -> tuple[OpenAITeacher, object]:
    cfg = TeacherCfg(backend="openai", model="m", base_url=base_url, tokenizer=tokenizer, max_retries=2,
                     backoff_s=0.01, **teacher)
    t = OpenAITeacher(cfg, GenerateCfg(top_k_logprobs=k, max_new_tokens=24))
    [completion] = t.chat([QUESTION])
    return t, completion


def entries_of(name: str) -> list[dict]:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))["response"]["choices"][0]["logprobs"]["content"]


def ids_and_first(entries: list[dict], tokenizer) -> tuple[list[int], list[float]]:
    """Local ids and the listed first alternative's log-prob of fixture entries, read by hand."""
    vocab = {tokenizer.decode([i]).encode(): i for i in range(len(tokenizer))}
    ids = [e["id"] if "id" in e else vocab[bytes(e["bytes"])] for e in entries]
    return ids, [e["top_logprobs"][0]["logprob"] for e in entries]


@pytest.mark.parametrize("fixture, stream", [("vllm-r1.json", False), ("vllm-r1-0.10.json", False),
                                             ("vllm-r1-stream.sse", True)])
def test_vllm_trace_and_answer_each_keep_their_topk(reasoning_dirs, fixture, stream):
    tokenizer = load_tokenizer(str(reasoning_dirs["r1"]))
    with ReplayServer(fixture) as server:
        teacher, c = ask(server.base_url, str(reasoning_dirs["r1"]), stream=stream)
    body = server.requests[0]
    assert body["stream"] is stream and body["logprobs"] is True and body["top_logprobs"] == 2
    assert ("stream_options" in body) is stream
    entries = entries_of("vllm-r1.json")
    tokens = [e["token"] for e in entries]
    end = tokens.index("</think>")
    # The trace: its entries up to </think> (the trailing newline token is whitespace), the answer
    # after it (the blank line before it too); the server lists no end of turn, so it is appended.
    trace_ids, trace_lp = ids_and_first(entries[:end - 1], tokenizer)
    answer_ids, answer_lp = ids_and_first(entries[end + 3:], tokenizer)
    assert tokens[end - 1] == "\n" and tokens[end + 1:end + 3] == ["\n", "\n"]
    assert c.reasoning == "Two plus three. That is five." and c.text == "The answer is 5." and c.finished
    assert c.reasoning_ids == trace_ids and c.token_ids == answer_ids + [tokenizer.eos_token_id]
    assert c.reasoning_topk_ids.shape == (len(trace_ids), 2) and (c.reasoning_topk_ids[:, 0] == trace_ids).all()
    assert np.allclose(c.reasoning_topk_logprobs[:, 0].astype(float), trace_lp, atol=1e-3)
    assert (c.topk_ids[:-1, 0] == answer_ids).all() and np.allclose(c.topk_logprobs[:-1, 0].astype(float), answer_lp,
                                                                    atol=1e-3)
    assert c.topk_logprobs[-1, 0] == 0 and c.tail_logprobs[-1] == -np.inf  # the appended end of turn: certain
    assert teacher.usage.reasoning_tokens == len(trace_ids) and teacher.usage.text_only == 0
    assert teacher.usage.completion_tokens == len(entries) and teacher.usage.retries == 0


def test_null_content_with_a_trace_is_an_answer_not_a_malformed_body(reasoning_dirs):
    with ReplayServer("vllm-r1-length.json") as server:
        teacher, c = ask(server.base_url, str(reasoning_dirs["r1"]))
    assert len(server.requests) == 1 and teacher.usage.retries == 0 and teacher.usage.failures == 0
    assert c.reasoning == "Two plus three." and c.text == "" and c.token_ids == [] and not c.finished
    assert c.reasoning_topk_ids is not None and len(c.reasoning_ids) == len(entries_of("vllm-r1-length.json"))
    assert teacher.usage.text_only == 0  # nothing to map: an empty answer is not a failed mapping
    # Without a trace, null content is still a broken body.
    from edgedistill.teachers.openai_compat import RetryableError

    with pytest.raises(RetryableError, match="malformed"):
        parse_chat_response(b'{"choices": [{"message": {"content": null}}]}')


def test_gpt_oss_harmony_channels_and_reasoning_effort(reasoning_dirs):
    tokenizer = load_tokenizer(str(reasoning_dirs["harmony"]))
    with ReplayServer("vllm-gptoss.json") as server:
        teacher, c = ask(server.base_url, str(reasoning_dirs["harmony"]), reasoning_effort="low")
    assert server.requests[0]["reasoning_effort"] == "low"
    assert "Reasoning: low" in tokenizer.decode(c.prompt_ids)  # the local prompt ids follow the effort
    entries = entries_of("vllm-gptoss.json")
    tokens = [e["token"] for e in entries]
    trace_ids, _ = ids_and_first(entries[tokens.index("<|message|>") + 1:tokens.index("<|end|>")], tokenizer)
    assert c.reasoning == "User asks 2+3. Answer 5." and c.text == "5"
    assert c.reasoning_ids == trace_ids and c.token_ids == [tokenizer.convert_tokens_to_ids("5"),
                                                            tokenizer.convert_tokens_to_ids("<|return|>")]
    assert (c.reasoning_topk_ids[:, 0] == trace_ids).all()


LLAMACPP = {  # fixture: (template, trace ids, answer ids incl. the end of turn the server lists)
    "llamacpp-qwen3-think_split.json": ("qwen3", [263] * 6, [372, 263, 263, 263, 2]),
    "llamacpp-qwen3-fmt_none.json": ("qwen3", [263] * 6, [372, 263, 263, 263, 2]),  # split from the content
    "llamacpp-r1-forced_open_split.json": ("r1", [263] * 6, [263] * 4 + [2]),
    "llamacpp-r1-unterminated_length.json": ("r1", [263] * 10, []),
}


@pytest.mark.parametrize("fixture", sorted(LLAMACPP))
def test_llamacpp_recordings_split_at_the_end_of_the_trace(reasoning_dirs, fixture):
    template, trace, answer = LLAMACPP[fixture]
    with ReplayServer(fixture) as server:
        teacher, c = ask(server.base_url, str(reasoning_dirs[template]))
    entries = entries_of(fixture)
    ids = [e["id"] for e in entries]
    end = ids.index(401) if 401 in ids else len(ids)  # </think>
    assert c.reasoning == "in" * len(trace) and c.reasoning_ids == trace and c.token_ids == answer
    # Each row is the server's own top list for that token (ids as llama.cpp sent them): the trace
    # rows are those of the entries just before </think>. Where the grammar forced a token its top
    # list lacks, the row is the token alone (padded with id 0): not the teacher's choice.
    def row(e: dict) -> list[int]:
        listed = [alt["id"] for alt in e["top_logprobs"]]
        return listed if e["id"] in listed else [e["id"], 0]

    trace_entries, answer_entries = entries[end - len(trace):end], entries[len(entries) - len(answer):]
    assert c.reasoning_topk_ids.tolist() == [row(e) for e in trace_entries]
    if answer:
        assert c.topk_ids.tolist() == [row(e) for e in answer_entries] and c.finished
        assert c.text in ("eininin", "inininin")
    else:
        assert c.text == "" and not c.finished and c.topk_ids is None
    forced = sum(row(e)[1:] == [0] for e in trace_entries + answer_entries)
    assert teacher.usage.forced_rows == forced and teacher.usage.text_only == 0 and teacher.usage.retries == 0


def test_a_budget_forced_end_of_trace_is_the_delimiter_not_data(reasoning_dirs):
    with ReplayServer("llamacpp-r1-budget3_forced_end.json") as server:
        teacher, c = ask(server.base_url, str(reasoning_dirs["r1"]))
    tokenizer = load_tokenizer(str(reasoning_dirs["r1"]))
    assert c.reasoning == "6\ufffd\x18" and tokenizer.decode(c.reasoning_ids) == c.reasoning
    assert 401 not in c.reasoning_ids and 401 not in c.token_ids  # the forced </think> belongs to neither side
    assert c.reasoning_topk_ids is not None and c.topk_ids is not None and teacher.usage.forced_rows == 0


def test_forced_rows_inside_a_trace_get_all_the_mass_on_the_token():
    from edgedistill.teachers.openai_compat import split_entries

    body = json.loads((FIXTURES / "llamacpp-r1-forced_open_split.json").read_text())["response"]
    listed = body["choices"][0]["logprobs"]["content"]
    # Make the first trace token look like a budget message token: not among its alternatives.
    listed[0]["top_logprobs"] = [{"id": 24, "token": "6", "bytes": [54], "logprob": -0.5}]
    chosen_missing = [i for i, e in enumerate(listed) if e["id"] not in [a["id"] for a in e["top_logprobs"]]
                      and e["id"] != 401]  # the </think> delimiter is neither trace nor answer
    trace, answer, forced = split_entries(parse_chat_response(json.dumps(body).encode()).logprobs,
                                          "in" * 6, "inininin")
    assert 0 in chosen_missing and forced == len(chosen_missing)
    assert trace[0]["logprob"] == 0.0 and trace[0]["top_logprobs"] == [] and trace[0]["id"] == 263
    assert len(trace) == 6 and len(answer) == 5


def test_llamacpp_streams_lose_entries_and_fall_back_to_text_only_where_they_must(reasoning_dirs):
    # qwen3: the stream leaves out the </think> entry and lists one opening piece: no split → text.
    with ReplayServer("llamacpp-qwen3-stream.sse") as server:
        teacher, c = ask(server.base_url, str(reasoning_dirs["qwen3"]), stream=True, k=1)
    assert c.reasoning == "inininininin" and c.text == "eininin"
    assert c.reasoning_topk_ids is None and c.topk_ids is None and teacher.usage.text_only == 1
    # r1: trace then answer entries with nothing between: the texts tell them apart.
    with ReplayServer("llamacpp-r1-stream.sse") as server:
        teacher, c = ask(server.base_url, str(reasoning_dirs["r1"]), stream=True, k=1)
    assert c.reasoning_ids == [263] * 6 and c.token_ids[:4] == [263] * 4
    assert c.reasoning_topk_ids.shape == (6, 1) and c.topk_ids is not None and teacher.usage.text_only == 0


def test_ollama_reasoning_field_with_and_without_logprobs(reasoning_dirs):
    tokenizer = load_tokenizer(str(reasoning_dirs["r1"]))
    trace_ids = tokenizer("Two plus three. That is five.", add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer("The answer is 5.", add_special_tokens=False)["input_ids"]
    for fixture, stream in (("ollama-qwen3.json", False), ("ollama-qwen3-stream.sse", True)):
        with ReplayServer(fixture) as server:
            teacher, c = ask(server.base_url, str(reasoning_dirs["r1"]), stream=stream)
        # No tags in the list: the texts split it; ids come from bytes (Ollama sends none).
        assert c.reasoning_ids == trace_ids and c.token_ids == answer_ids + [tokenizer.eos_token_id], fixture
        assert (c.reasoning_topk_ids[:, 0] == trace_ids).all() and teacher.usage.text_only == 0
    with ReplayServer("ollama-qwen3-nologprobs.json") as server:  # Ollama before 0.12.11
        teacher, c = ask(server.base_url, str(reasoning_dirs["r1"]))
    assert c.reasoning == "Two plus three. That is five." and c.reasoning_ids == trace_ids
    assert c.reasoning_topk_ids is None and c.topk_ids is None and teacher.usage.text_only == 1
    assert teacher.usage.reasoning_tokens == len(trace_ids)  # counted locally: the server gives no breakdown


def test_a_stream_cut_before_its_finish_reason_is_retried():
    from edgedistill.teachers.openai_compat import RetryableError

    body = (FIXTURES / "vllm-r1-stream.sse").read_bytes()
    whole = parse_chat_stream(body)
    assert whole.reasoning == "Two plus three. That is five.\n" and whole.text == "\n\nThe answer is 5."
    with pytest.raises(RetryableError, match="finish_reason"):
        parse_chat_stream(body[: len(body) // 2].rsplit(b"\n\n", 1)[0])
