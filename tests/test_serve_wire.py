"""The OpenAI wire format of `edgedistill serve` on both engines, on the tiny model: legacy
`/v1/completions` (echo, token-id prompts, batches) scored against a transformers forward pass
computed here, bad requests answered with a 400 that names the field, and engines that answer
only the front (issues #20 and #22)."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch
from conftest import ServeProcess, subprocess_env
from openai.types import Completion

# Per-token log-probability agreement with transformers: the transformers engine runs the same
# float32 forward (1e-5); llama.cpp in exact mode on an F32 GGUF was measured at 3.7e-6 and the
# export tests assert 1e-4 (tests/test_export.py), the bound used for both.
TOL = 1e-4
CHAT = [{"role": "user", "content": "価格は ¥12,800 です。Is that cheap?"}, {"role": "assistant", "content": "はい、安いです。"}]


@pytest.fixture(scope="module")
def llamacpp_server(tiny_f32_gguf):
    server = ServeProcess(str(tiny_f32_gguf), "--exact", "--max-tokens", "64", "--threads", "1")
    server.engine = "llamacpp"
    yield server
    server.stop()


@pytest.fixture(scope="module")
def transformers_server(tiny_teacher_dir):
    server = ServeProcess(str(tiny_teacher_dir), "--max-tokens", "64", "--threads", "1")
    server.engine = "transformers"
    yield server
    server.stop()


@pytest.fixture(params=["llamacpp", "transformers"])
def served(request):
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture(scope="module")
def reference(tiny_teacher_dir):
    from edgedistill.models.hf import load_causal_lm

    model, tokenizer, _ = load_causal_lm(str(tiny_teacher_dir))
    return model, tokenizer


def logprobs_of(model, ids: list[int]) -> torch.Tensor:
    """(T, V) float64: row t is the distribution of the token after ids[:t + 1]."""
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)


def model_id(server: ServeProcess) -> str:
    return httpx.get(server.base + "/v1/models").json()["data"][0]["id"]


def echo_positions(server: ServeProcess) -> dict[str, float]:
    """The front's count of prompt positions scored on llama.cpp, by source."""
    text = httpx.get(server.base + "/metrics").text
    prefix = "edgedistill_echo_positions_total{source="
    counts = {line[len(prefix):].split("}")[0].strip('"'): float(line.split()[-1])
              for line in text.splitlines() if line.startswith(prefix)}
    return {source: counts.get(source, 0.0) for source in ("engine", "cache", "fallback")}


def test_echo_scores_every_prompt_token_as_transformers_does(served, reference):
    model, tokenizer = reference
    # Special tokens, ASCII and Japanese spelled in byte pieces that end inside a character
    # (where llama.cpp sends no entry and the front reads the token from a list instead).
    ids = tokenizer(tokenizer.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"]
    before = echo_positions(served)
    parsed = served.client().completions.create(model=model_id(served), prompt=[ids], echo=True, logprobs=3,
                                                max_tokens=1, temperature=0)
    strict = parsed.model_dump()  # every field as the official client types it, but the first
    strict["choices"][0]["logprobs"]["token_logprobs"][0] = 0.0  # token's null, which OpenAI sent and
    strict["choices"][0]["logprobs"]["top_logprobs"][0] = {}  # the client's types leave out
    Completion.model_validate(strict)
    logprobs = parsed.choices[0].logprobs
    assert len(logprobs.token_logprobs) == len(ids) + 1  # the acceptance check: the prompt, then one token
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    expected = logprobs_of(model, ids)
    for i in range(1, len(ids)):
        got, top = logprobs.token_logprobs[i], logprobs.top_logprobs[i]
        assert got == pytest.approx(float(expected[i - 1, ids[i]]), abs=TOL), (i, tokenizer.decode(ids[i]))
        best, second = expected[i - 1].topk(2).values.tolist()
        assert max(top.values()) == pytest.approx(best, abs=TOL) and len(top) <= 3
        if best - second > 1e-3:  # clear of near-ties: lm-eval's is_greedy is an exact float comparison
            assert (max(top.values()) == got) == (int(expected[i - 1].argmax()) == ids[i]), i
    generated = int(expected[-1].argmax())
    assert logprobs.token_logprobs[-1] == pytest.approx(float(expected[-1, generated]), abs=TOL)
    assert max(logprobs.top_logprobs[-1].values()) == logprobs.token_logprobs[-1]
    text = parsed.choices[0].text
    assert text.startswith(tokenizer.decode(ids)) and tokenizer.decode(ids).endswith("<|im_end|>\n")
    for i, offset in enumerate(logprobs.text_offset[:len(ids)]):
        prefix = tokenizer.decode(ids[:i])
        if "\ufffd" not in prefix:
            assert offset == len(prefix), i
    assert parsed.usage.prompt_tokens == len(ids) and parsed.usage.completion_tokens == 1
    if served.engine == "llamacpp":  # the byte pieces were read from a list, the rest forced one by one
        after = echo_positions(served)
        assert after["engine"] - before["engine"] == len(ids) - 1 and after["fallback"] > before["fallback"]


def test_batches_of_token_ids_and_strings_give_one_choice_per_prompt(served, reference):
    _, tokenizer = reference
    client, name = served.client(), model_id(served)
    first, second = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("The sea is calm", "東京タワー"))
    batch = client.completions.create(model=name, prompt=[first, second], echo=True, logprobs=1, max_tokens=0)
    assert [c.index for c in batch.choices] == [0, 1]
    for choice, ids in zip(batch.choices, [first, second]):
        alone = client.completions.create(model=name, prompt=ids, echo=True, logprobs=1, max_tokens=0).choices[0]
        assert len(choice.logprobs.token_logprobs) == len(ids)  # max_tokens 0: the prompt only
        assert choice.logprobs.token_logprobs[1:] == pytest.approx(alone.logprobs.token_logprobs[1:], abs=1e-6)
        assert choice.text == tokenizer.decode(ids)
    texts = client.completions.create(model=name, prompt=["The sea is calm", "東京タワー"], echo=True, max_tokens=2,
                                      temperature=0)
    assert [c.text[:len(p)] for c, p in zip(texts.choices, ["The sea is calm", "東京タワー"])] == \
           ["The sea is calm", "東京タワー"]
    assert texts.usage.prompt_tokens == len(first) + len(second)
    streamed = list(client.completions.create(model=name, prompt="The sea is", max_tokens=4, temperature=0,
                                              logprobs=1, stream=True))
    entries = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert entries and all(len(e.tokens) == len(e.token_logprobs) == len(e.top_logprobs) for e in entries)


@pytest.mark.parametrize("endpoint, body, param", [
    ("chat/completions", {"messages": []}, "messages"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": -5}, "temperature"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, "top_p"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": 3}, "logprobs"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ("completions", {"max_tokens": 3}, "prompt"),
    ("completions", {"prompt": [[]]}, "prompt"),
    ("completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("completions", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("completions", {"prompt": "x", "echo": True, "stream": True}, "echo"),
    ("completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("completions", {"prompt": "x", "stop": [1]}, "stop"),
])
def test_bad_requests_are_a_400_naming_the_field(served, endpoint, body, param):
    answer = httpx.post(f"{served.base}/v1/{endpoint}", json=body, timeout=60)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and "Traceback" not in answer.text


def test_what_an_engine_cannot_do_is_refused_by_name_and_routes_answer_openai_errors(served):
    client, name = served.client(), model_id(served)
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=name, prompt="x", max_tokens=2, best_of=2)
    assert refused.value.param == "best_of" and "best_of" in str(refused.value)
    if served.engine == "transformers":  # llama.cpp does logit_bias; this engine says it does not
        with pytest.raises(openai.BadRequestError, match="'logit_bias' is not supported by the transformers"):
            client.completions.create(model=name, prompt="x", max_tokens=2, logit_bias={"5": 1.0})
    wrong_method = httpx.get(served.base + "/v1/completions")
    assert wrong_method.status_code == 405 and "POST" in wrong_method.json()["error"]["message"]
    unknown = httpx.post(served.base + "/v1/nothing", json={})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "invalid_request_error"


def test_the_engine_answers_only_the_front(served):
    """Issue #20: the engine on its random loopback port took requests from anyone, past the
    front's key and limits. It now wants a key of its own that only the front knows."""
    engine = f"http://127.0.0.1:{served.engine_port()}"
    question = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for key in (None, "wrong"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        assert httpx.post(engine + "/v1/chat/completions", json=question, headers=headers).status_code == 401
        assert httpx.post(engine + "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                          headers=headers).status_code == 401
        for path in ("/props", "/slots", "/v1/models"):
            assert httpx.get(engine + path, headers=headers).status_code == 401
    assert httpx.post(served.base + "/v1/chat/completions", json=question, timeout=60).status_code == 200


def test_a_question_shared_by_several_choices_is_scored_once(llamacpp_server, reference):
    _, tokenizer = reference
    question = tokenizer("Which ocean is the largest? Answer:", add_special_tokens=False)["input_ids"]
    choices = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in (" Pacific", " Atlantic ocean")]

    sequences = [question + choice for choice in choices]
    shared = next(i for i, (a, b) in enumerate(zip(*sequences)) if a != b)  # the question and a space
    assert shared > len(question)
    # Position i scores sequence[i] after sequence[:i]: the first request scores all but the first
    # token; the second finds positions 1 .. shared - 1 remembered and scores the rest.
    for sequence, cached in zip(sequences, [0, shared - 1]):
        before = echo_positions(llamacpp_server)
        answer = httpx.post(llamacpp_server.base + "/v1/completions", timeout=120, json={
            "prompt": [sequence], "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0})
        assert answer.status_code == 200
        after = echo_positions(llamacpp_server)
        assert after["cache"] - before["cache"] == cached
        assert after["engine"] - before["engine"] == len(sequence) - 1 - cached


def test_an_end_token_that_ends_the_answer_gets_its_entry(reference):
    """lm-eval reads the last entry as the generated token: it must be there when it is the end
    of turn too. Chat keeps llama.cpp's layout (no entry for it)."""
    from edgedistill.serve.hf_engine import DecodeRequest, Finish, Step, decode

    model, tokenizer = reference
    prompt = tokenizer("The sea is", add_special_tokens=False)["input_ids"]
    first = int(logprobs_of(model, prompt)[-1].argmax())
    items = list(decode(model, tokenizer, DecodeRequest(prompt, max_tokens=4, temperature=0, top_logprobs=2),
                        end_ids={first}))
    steps = [i for i in items if isinstance(i, Step)]
    assert [(s.token_id, s.end, s.delta) for s in steps] == [(first, True, "")]
    assert steps[0].logprob == pytest.approx(float(logprobs_of(model, prompt)[-1, first]), abs=1e-5)
    assert isinstance(items[-1], Finish) and items[-1].reason == "stop" and items[-1].completion_tokens == 0


def test_serve_takes_its_port_before_loading_and_listens_on_ipv6_loopback(tiny_f32_gguf):
    """Issue #20: `--host ::1` was refused as reachable from other machines, and a port in use
    was found by uvicorn only after the model had loaded (exit 3)."""
    server = ServeProcess(str(tiny_f32_gguf), host="::1")
    try:
        assert server.base.startswith("http://[::1]:")
        assert httpx.get(server.base + "/health").json()["status"] == "ok"
        started = time.monotonic()
        busy = subprocess.run([sys.executable, "-m", "edgedistill", "serve", str(tiny_f32_gguf), "--host", "::1",
                               "--port", str(server.port)], env=subprocess_env(), capture_output=True, text=True,
                              timeout=120)
        assert busy.returncode == 2, busy.stderr
        errors = [line for line in (busy.stdout + busy.stderr).splitlines() if line.strip()]
        assert len(errors) == 1 and "already in use" in errors[0] and f"[::1]:{server.port}" in errors[0]
        assert time.monotonic() - started < 60
    finally:
        server.stop()
