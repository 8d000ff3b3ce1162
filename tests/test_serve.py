"""The private server, started with the real CLI on 127.0.0.1 and driven by the official openai client."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from conftest import ServeProcess, subprocess_env

MODEL = "SmolLM2-135M-Instruct-Q4_1"


@pytest.fixture(scope="module")
def server():
    running = ServeProcess("embedded", "--parallel", "2", "--queue", "2", "--max-tokens", "256")
    yield running
    running.stop()


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_chat_logprobs_and_usage(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    answer = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0,
                                            logprobs=True, top_logprobs=3, seed=1)
    choice = answer.choices[0]
    assert answer.model == MODEL and choice.message.content and choice.finish_reason in ("length", "stop")
    assert len(choice.logprobs.content) >= 1 and len(choice.logprobs.content[0].top_logprobs) == 3
    assert answer.usage.prompt_tokens > 0 and 0 < answer.usage.completion_tokens <= 12


def test_streaming_gives_the_same_text_and_usage(server):
    client = server.client()
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    raw = httpx.post(server.base + "/v1/chat/completions", timeout=60,
                     json={"messages": QUESTION, "max_tokens": 4, "stream": True}).text
    assert raw.rstrip().endswith("data: [DONE]")


def test_stop_sequences_and_plain_completions(server):
    client = server.client()
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "List three fruits, one per line."}],
                                            max_tokens=40, temperature=0, stop=["\n"])
    assert "\n" not in answer.choices[0].message.content
    completion = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert completion.choices[0].text and completion.model == MODEL


def test_errors_are_openai_shaped_never_500(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="above this server's limit"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="top_logprobs must be between"):
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, logprobs=True, top_logprobs=50)
    bad = httpx.post(server.base + "/v1/chat/completions", content=b"{not json", timeout=10,
                     headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    huge = httpx.post(server.base + "/v1/chat/completions", timeout=10, json={
        "messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    assert huge.status_code == 413 and "error" in huge.json()
    too_long = httpx.post(server.base + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "word " * 6000}], "max_tokens": 4})
    assert too_long.status_code == 400 and "error" in too_long.json() and "Traceback" not in too_long.text


def test_health_and_metrics(server):
    assert httpx.get(server.base + "/health").json() == {"status": "ok", "model": MODEL}
    text = httpx.get(server.base + "/metrics").text
    assert 'edgedistill_requests_total{endpoint="chat/completions",status="200"}' in text
    assert "edgedistill_tokens_total" in text and "edgedistill_request_seconds_bucket" in text
    assert "edgedistill_queue_depth" in text
    page = httpx.get(server.base + "/").text
    assert "<title>" + MODEL in page and "/v1/chat/completions" in page


def test_overload_is_shed_with_503_and_the_server_stays_up():
    server = ServeProcess("embedded", "--parallel", "1", "--queue", "0")
    try:
        results: list[int] = []

        def ask() -> None:
            response = httpx.post(server.base + "/v1/chat/completions", timeout=120, json={
                "messages": QUESTION, "max_tokens": 48, "temperature": 0})
            results.append(response.status_code)
            if response.status_code == 503:
                assert response.headers["retry-after"] == "1" and response.json()["error"]["code"] == "overloaded"

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results.count(200) >= 1 and results.count(503) >= 1, results
        # A client that leaves mid-stream frees its slot: the next request is served.
        with httpx.stream("POST", server.base + "/v1/chat/completions", timeout=120, json={
                "messages": QUESTION, "max_tokens": 400, "stream": True}) as stream:
            next(stream.iter_lines())
        deadline = time.monotonic() + 10
        while True:
            again = httpx.post(server.base + "/v1/chat/completions", timeout=120,
                               json={"messages": QUESTION, "max_tokens": 4})
            if again.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert again.status_code == 200
    finally:
        log = server.stop()
    assert "capital of France" not in log  # no prompt text in the logs by default


def test_closed_by_default_and_keys_when_asked():
    refused = subprocess.run([sys.executable, "-m", "edgedistill", "serve", "embedded", "--host", "0.0.0.0"],
                             env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "needs" not in refused.stdout
    assert [line for line in refused.stderr.splitlines() if line.startswith("error:")][0].count("API key") == 1
    server = ServeProcess("embedded", "--api-key-env", "EDGE_SERVE_KEY", env={"EDGE_SERVE_KEY": "sk-local-123"})
    try:
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").models.list()
        assert httpx.get(server.base + "/v1/models").status_code == 401
        assert [m.id for m in server.client("sk-local-123").models.list().data] == [MODEL]
    finally:
        server.stop()


def test_round_trip_the_server_is_a_teacher_for_the_data_engine(server, tmp_path):
    from edgedistill.data.store import load_distill_set
    from edgedistill.pipeline import run_recipe
    from edgedistill.recipe import build_recipe

    recipe = build_recipe({
        "run": {"name": "via-serve", "runs_dir": str(tmp_path / "runs")},
        "teacher": {"backend": "openai", "model": MODEL, "tokenizer": "embedded", "base_url": server.base + "/v1",
                    "concurrency": 2},
        "generate": {"limit_per_source": 2, "max_new_tokens": 8, "top_k_logprobs": 5},
    }, "<round trip>")
    samples = load_distill_set(run_recipe(recipe, only="generate"))
    assert len(samples) == 4 and all(s.topk_ids is not None and s.topk_ids.shape[1] == 5 for s in samples)
    assert json.loads(json.dumps(samples[0].messages))[-1]["role"] == "assistant"


def test_a_run_folder_serves_its_best_exported_file(tmp_path):
    from edgedistill.errors import UserError
    from edgedistill.serve.server import api_key, resolve_model

    run = tmp_path / "my-run"
    (run / "student").mkdir(parents=True)
    (run / "student" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no GGUF yet — run `edgedistill export"):
        resolve_model(str(run), "llamacpp")
    (run / "export").mkdir()
    for kind in ("f16", "q4_k_m", "q8_0"):
        (run / "export" / f"my-run-{kind}.gguf").write_bytes(b"GGUF")
    assert resolve_model(str(run)) == ("llamacpp", run / "export" / "my-run-q8_0.gguf", "my-run")
    with pytest.raises(UserError, match="API key"):
        api_key(None, "0.0.0.0")
    assert api_key(None, "127.0.0.1") is None and api_key(None, "localhost") is None
    assert api_key(None, "::1") is None  # IPv6 loopback (was refused: "http://::1" has no host)


@pytest.mark.browser
def test_the_chat_page_answers_in_a_browser(server, chromium_page, tmp_path):
    page = chromium_page
    page.goto(server.base + "/")
    assert MODEL in page.title()
    page.fill("#question", "What is the capital of France?")
    page.click("#send")
    page.wait_for_function("document.querySelector('.assistant') && "
                           "document.querySelector('.assistant').textContent.trim().length > 10", timeout=60_000)
    page.wait_for_function("document.querySelector('#send').disabled === false", timeout=60_000)
    assert page.text_content(".user") == "What is the capital of France?"
    answer = page.text_content(".assistant")
    assert answer.strip() and "error" not in answer
    page.screenshot(path=str(tmp_path / "chat.png"))
    assert (tmp_path / "chat.png").stat().st_size > 5_000
