"""The `openai` teacher against llama.cpp's real OpenAI-compatible server on 127.0.0.1 (the
embedded SmolLM2 GGUF), directly and through a fault-injecting proxy."""

from __future__ import annotations

import contextlib
import http.server
import json
import random
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import numpy as np
import pytest
from conftest import subprocess_env
from faultproxy import FAULTS, FaultProxy

from edgedistill.errors import UserError
from edgedistill.models.vocab import VocabMap
from edgedistill.net import free_port, is_loopback
from edgedistill.pipeline import run_recipe
from edgedistill.recipe import build_recipe
from edgedistill.run import Ledger, RunDir
from edgedistill.teachers.openai_compat import (
    RetryableError,
    backoff_delay,
    parse_chat_response,
    parse_retry_after,
    sparse_target,
)


@pytest.fixture(scope="module")
def llamacpp():
    from edgedistill.models.hf import embedded_gguf_path
    from edgedistill.models.llamacpp import start_llamacpp_server

    with start_llamacpp_server(embedded_gguf_path(), parallel=2, ctx_per_slot=1024, alias="smollm2") as server:
        yield server


def upstream(server) -> str:
    return f"http://{server.host}:{server.port}"


def openai_recipe(tmp_path, base_url: str, name: str = "remote", teacher: dict | None = None,
                  generate: dict | None = None, student: dict | None = None):
    return build_recipe({
        "run": {"name": name, "runs_dir": str(tmp_path / "runs")},
        "teacher": {"backend": "openai", "model": "smollm2", "tokenizer": "embedded", "base_url": base_url,
                    "concurrency": 2, "timeout_s": 20, "backoff_s": 0.05, "backoff_max_s": 2,
                    **(teacher or {})},
        "generate": {"limit_per_source": 4, "max_new_tokens": 12, "batch_size": 4, "top_k_logprobs": 8,
                     **(generate or {})},
        "student": {"keep_layers": 24, **(student or {})},
    }, "<openai test recipe>")


def stored(run: RunDir):
    from edgedistill.data.store import load_distill_set

    return load_distill_set(run)


def usage(run: RunDir) -> dict[str, float]:
    ledger = Ledger(run.ledger_path)
    try:
        return ledger.usage()[("generate", "smollm2")]
    finally:
        ledger.close()


# --- against the real server --------------------------------------------------------------------

def test_llamacpp_server_gives_a_distill_set_in_the_hf_format(tmp_path, llamacpp):
    from datasets import load_from_disk

    from edgedistill.models.hf import encode_prompts, load_causal_lm, score_sequences

    run = run_recipe(openai_recipe(tmp_path, llamacpp.base_url), only="generate")
    samples = stored(run)
    assert len(samples) == 8 and {s.lang for s in samples} == {"en", "ja"}
    model, tokenizer, _ = load_causal_lm("embedded")
    agree = total = 0
    for s in samples:
        assert s.topk_ids is not None, f"no KD target for {s.answer!r}"  # Japanese included
        assert s.topk_ids.dtype == np.int32 and s.topk_logprobs.dtype == np.float16
        assert s.topk_ids.shape == (len(s.answer_ids), 8) and s.tail_logprobs.shape == (len(s.answer_ids),)
        assert tokenizer.decode(s.answer_ids.tolist(), skip_special_tokens=True).strip() == s.answer
        # The prompt ids are what the server saw: its chat template = the tokenizer's.
        assert s.prompt_ids.tolist() == encode_prompts(tokenizer, [s.prompt_messages])[0]
        mass = np.exp(s.topk_logprobs.astype(np.float64)).sum(1) + np.exp(s.tail_logprobs.astype(np.float64))
        assert np.allclose(mass, 1.0, atol=2e-3)
        # Token ids map onto the right vocabulary: transformers on the same weights agrees on
        # the top-1 token (Q4_1 in llama.cpp vs de-quantised float32, so not everywhere).
        scored = score_sequences(model, tokenizer, [(s.prompt_ids.tolist(), s.answer_ids.tolist())], 8)[0]
        lp = s.topk_logprobs.astype(np.float32)
        # Rows with the server's real distribution and a clear winner (top-1 ahead by > 1 nat):
        # near ties may flip between the two runtimes' arithmetic, a wrong id mapping would not.
        clear = (lp[:, 1] > -np.inf) & (lp[:, 0] - lp[:, 1] > 1.0)
        agree += int((scored.topk_ids[clear, 0] == s.topk_ids[clear, 0]).sum())
        total += int(clear.sum())
    assert total > 30 and agree / total >= 0.95, (agree, total)
    spent = usage(run)
    assert spent["requests"] == 8 and spent.get("retries", 0) == 0 and spent.get("failures", 0) == 0
    assert spent["prompt_tokens"] == sum(len(s.prompt_ids) for s in samples)
    assert spent["completion_tokens"] >= sum(len(s.answer_ids) for s in samples) - 8  # + appended end-of-turn
    dataset = load_from_disk(str(run.dataset_dir))
    assert dataset["train"].num_rows + dataset["heldout"].num_rows == 8
    row = dataset["train"][0]
    assert len(row["topk_ids"]) == len(row["answer_ids"]) and len(row["topk_ids"][0]) == 8
    lines = run.dataset_jsonl_path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 8 and json.loads(lines[0])["messages"][-1]["role"] == "assistant"


def test_another_vocabulary_keeps_answers_as_text_tokenised_locally(tmp_path, llamacpp, tiny_teacher_dir):
    from transformers import AutoTokenizer

    recipe = openai_recipe(tmp_path, llamacpp.base_url, teacher={"tokenizer": str(tiny_teacher_dir)},
                           student={"keep_layers": 2})
    run = run_recipe(recipe, only="generate")
    samples = stored(run)
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    assert len(samples) == 8 and all(s.topk_ids is None for s in samples)
    for s in samples:  # the student's ids of the teacher's text, end-of-turn appended when it stopped
        ids = s.answer_ids.tolist()
        assert tokenizer.decode(ids, skip_special_tokens=True).strip() == s.answer
        assert (ids[-1] == tokenizer.eos_token_id) == s.finished and tokenizer.eos_token_id not in ids[:-1]
    stage = Ledger(run.ledger_path).metrics("generate", "stage")["stage"]
    assert stage["text_only_answers"] == 8 and usage(run)["text_only"] == 8


def test_injected_faults_lose_nothing_duplicate_nothing_and_are_counted(tmp_path, llamacpp):
    # llama.cpp's greedy answers depend on what its slots held before (prompt cache) and on which
    # requests share a batch (measured: the same prompt gave このように, then このよう after another
    # prompt); faults change that order, so both runs ask one at a time without the prompt cache.
    generate = {"limit_per_source": 8}
    exact = {"extra_body": {"cache_prompt": False}, "concurrency": 1}
    with FaultProxy(upstream(llamacpp), fault_rate=0.3, stall_s=4, retry_after_s=1) as proxy:
        recipe = openai_recipe(tmp_path, proxy.base_url, name="faults", generate=generate,
                               teacher={"timeout_s": 2.5, "max_retries": 8} | exact)
        run = run_recipe(recipe, only="generate")
        counts = dict(proxy.state.counts)
        assert all(counts.get(fault, 0) >= 1 for fault in FAULTS), counts
        samples = stored(run)
        assert len(samples) == 16 and len({s.id for s in samples}) == 16
        spent = usage(run)
        assert spent["retries"] == counts["faults"] and spent.get("failures", 0) == 0
        assert spent["requests"] == 16
        # Same command again: everything is stored, the teacher is not asked again.
        run_recipe(recipe, only="generate")
        assert proxy.state.counts["requests"] == counts["requests"]
    # Nothing a fault produced was stored: the same prompts straight from the server agree.
    direct = stored(run_recipe(openai_recipe(tmp_path, llamacpp.base_url, name="direct", generate=generate,
                                             teacher=exact), only="generate"))
    assert {s.id: s.answer for s in direct} == {s.id: s.answer for s in samples}
    assert all(np.array_equal(a.answer_ids, b.answer_ids) for a, b in zip(sorted(direct, key=lambda s: s.id),
                                                                          sorted(samples, key=lambda s: s.id)))


def test_a_prompt_that_keeps_failing_is_counted_never_stored_and_asked_again_next_time(tmp_path, llamacpp):
    with FaultProxy(upstream(llamacpp), fault_rate=0.0, always="http_500") as proxy:
        recipe = openai_recipe(tmp_path, proxy.base_url, teacher={"max_retries": 1})
        with pytest.raises(UserError, match="failed on 8 of 8 prompts"):
            run_recipe(recipe, only="generate")
        run = RunDir.for_recipe(recipe)
        spent = usage(run)
        assert spent["failures"] == 8 and spent["retries"] == 8 and spent["requests"] == 8
        assert not run.distill_set_path.exists()
        proxy.state.always = None
        run_recipe(recipe, only="generate")
        assert len(stored(run)) == 8
        assert usage(run)["requests"] == 16  # the ledger keeps every attempt's spend


BUSINESS_SEEDS = [
    {"instruction": "次のメールに返信してください。", "input": "山田です。請求書の件は yamada.taro@example.co.jp "
     "または 03-1234-5678 までご連絡ください。注文番号 ORD-20261128-0042、金額 ¥12,800、納期 2026-12-01 です。"},
    {"instruction": "Summarize this support ticket.", "input": "Customer Jane Roe (jane.roe@example.com, "
     "+1 415 555 0123) paid with card 4111 1111 1111 1111 on 2026-11-28; order #88231, total $1,299.00."},
    {"instruction": "この申請書の要点をまとめてください。", "input": "申請者のマイナンバー 1234 5678 9018、"
     "住所 〒100-0001 東京都千代田区。接続元 IP 192.168.10.24。"},
    {"instruction": "Write a one-line reply.", "input": "Meeting moved to 2026-12-03 at 10:30, room 4B, budget 250,000 JPY."},
]


def test_pii_is_scrubbed_before_it_reaches_the_server_and_counted(tmp_path, llamacpp):
    seeds = tmp_path / "business.jsonl"
    seeds.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in BUSINESS_SEEDS), encoding="utf-8")
    with FaultProxy(upstream(llamacpp), fault_rate=0.0) as proxy:
        recipe = openai_recipe(tmp_path, proxy.base_url, generate={"seeds": [str(seeds)], "heldout_fraction": 0.25})
        run = run_recipe(recipe, only="generate")
        sent = b"".join(proxy.state.bodies).decode("utf-8")  # raw, as it went over the wire
    sent_text = "\n".join(json.loads(body)["messages"][0]["content"] for body in proxy.state.bodies)
    for secret in ("yamada.taro@example.co.jp", "03-1234-5678", "jane.roe@example.com", "415 555 0123",
                   "4111 1111 1111 1111", "1234 5678 9018", "100-0001", "192.168.10.24"):
        assert secret not in sent_text and secret not in sent
    for kept in ("ORD-20261128-0042", "¥12,800", "2026-12-01", "#88231", "$1,299.00", "2026-12-03", "250,000"):
        assert kept in sent_text, kept
    assert "[EMAIL]" in sent_text and "[MY_NUMBER]" in sent_text and "[PHONE]) paid" in sent_text
    stage = Ledger(run.ledger_path).metrics("generate", "stage")["stage"]
    assert stage["pii_email"] == 2 and stage["pii_credit_card"] == 1 and stage["pii_my_number"] == 1
    assert stage["pii_phone"] == 2 and stage["pii_postal_code"] == 1 and stage["pii_ipv4"] == 1
    # The local record holds what the teacher saw, and its id is the hash of that.
    assert all("@example" not in json.dumps(s.messages, ensure_ascii=False) for s in stored(run))


def test_api_key_comes_from_the_named_variable_and_is_never_written(tmp_path, llamacpp, monkeypatch):
    key = "sk-edgedistill-test-0123456789"
    with FaultProxy(upstream(llamacpp), fault_rate=0.0, require_key=key) as proxy:
        recipe = openai_recipe(tmp_path, proxy.base_url, teacher={"api_key_env": "EDGEDISTILL_TEST_KEY"},
                               generate={"limit_per_source": 2})
        monkeypatch.delenv("EDGEDISTILL_TEST_KEY", raising=False)
        with pytest.raises(UserError, match="EDGEDISTILL_TEST_KEY is not set"):
            run_recipe(recipe, only="generate")
        monkeypatch.setenv("EDGEDISTILL_TEST_KEY", "sk-wrong")
        with pytest.raises(UserError, match=r"refused the request \(HTTP 401\)"):
            run_recipe(recipe, only="generate")
        monkeypatch.setenv("EDGEDISTILL_TEST_KEY", key)
        run = run_recipe(recipe, only="generate")
        assert len(stored(run)) == 4
        assert proxy.state.headers[-1]["Authorization"] == f"Bearer {key}"
    for path in run.root.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


def test_cli_reports_a_refused_key_in_one_line_with_exit_2(tmp_path, llamacpp):
    with FaultProxy(upstream(llamacpp), fault_rate=0.0, require_key="right") as proxy:
        recipe = tmp_path / "remote.toml"
        recipe.write_text(f"""
[run]
name = "cli"
runs_dir = "{tmp_path / 'runs'}"
[teacher]
backend = "openai"
model = "smollm2"
tokenizer = "embedded"
base_url = "{proxy.base_url}"
api_key_env = "EDGEDISTILL_TEST_KEY"
[generate]
limit_per_source = 2
""", encoding="utf-8")
        env = subprocess_env() | {"EDGEDISTILL_TEST_KEY": "wrong"}
        done = subprocess.run([sys.executable, "-m", "edgedistill", "generate", str(recipe)], env=env,
                              capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "HTTP 401" in errors[0] and "Traceback" not in done.stderr


# --- the server is probed once, before any prompt ----------------------------------------------

class _Html(http.server.BaseHTTPRequestHandler):
    """A plain web server: GET answers an HTML page, anything else 501 (http.server's default)."""

    def do_GET(self) -> None:  # noqa: N802
        body = b"<!doctype html><title>intranet</title><p>hello"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def plain_web_server(handler: type[http.server.BaseHTTPRequestHandler]):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def _probe_error(tmp_path, base_url: str, model: str = "smollm2") -> str:
    recipe = openai_recipe(tmp_path, base_url, teacher={"model": model})
    started = time.monotonic()
    with pytest.raises(UserError) as caught:
        run_recipe(recipe, only="generate")
    assert time.monotonic() - started < 30  # one probe, not a minute of retries
    return str(caught.value)


def test_nothing_listening_is_one_line_naming_the_url(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    message = _probe_error(tmp_path, url)
    assert "nothing answers at " + url in message and "connection refused" in message


@pytest.mark.parametrize("handler, status", [(_Html, "HTTP 200 with text/html"),
                                             (http.server.BaseHTTPRequestHandler, "HTTP 501 with text/html")])
def test_a_web_server_that_is_not_an_openai_api_is_named(tmp_path, handler, status):
    with plain_web_server(handler) as url:
        message = _probe_error(tmp_path, url)
    assert f"{url}/models answered {status}, not an OpenAI model list" in message


def test_a_model_the_server_does_not_serve_is_named_with_what_it_serves(tmp_path, llamacpp):
    message = _probe_error(tmp_path, llamacpp.base_url, model="gpt-oss-20b")
    assert message == (f"teacher.model: 'gpt-oss-20b' is not served at {llamacpp.base_url} (it serves: smollm2)")


# --- the pieces ---------------------------------------------------------------------------------

def test_retry_after_reads_seconds_and_http_dates():
    assert parse_retry_after("3") == 3.0 and parse_retry_after(" 1.5 ") == 1.5
    future = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 <= parse_retry_after(future) <= 31
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("-4") == 0.0


def test_backoff_grows_with_full_jitter_and_honours_retry_after_up_to_the_cap():
    rng = random.Random(1)
    delays = [backoff_delay(attempt, 0.5, 30, None, rng) for attempt in range(8) for _ in range(50)]
    assert all(0 <= d <= 30 for d in delays)
    assert max(delays[:50]) <= 0.5 and max(delays[-50:]) > 10  # grows, capped
    assert backoff_delay(0, 0.5, 30, 7.0, rng) >= 7.0
    assert backoff_delay(0, 0.5, 30, 600.0, rng) == 30  # a server cannot park us for 10 minutes


def test_malformed_bodies_are_retryable_never_data():
    good = {"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 3}}
    answer = parse_chat_response(json.dumps(good).encode())
    assert answer.text == "hi" and answer.finished and answer.prompt_tokens == 3
    for bad in (b'{"choices": [{"mess', b"", b"[]", b'{"choices": []}', b'{"choices": [{"message": {"content": null}}]}',
                json.dumps({"choices": [{"message": {"content": "x"}, "logprobs": {"content": "oops"}}]}).encode()):
        with pytest.raises(RetryableError, match="malformed"):
            parse_chat_response(bad)


def test_loopback_detection():
    assert is_loopback("http://127.0.0.1:8080/v1") and is_loopback("http://localhost/v1")
    assert is_loopback("http://[::1]:80/v1")
    assert not is_loopback("https://api.openai.com/v1") and not is_loopback("http://10.0.0.5/v1")


def test_vocab_map_reads_byte_level_tokens_and_spells_bytes(tiny_teacher_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    vocab = VocabMap(tokenizer)
    text = "Hello 世界 — naïve café 🙂"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert b"".join(vocab.id_bytes[i] for i in ids) == text.encode("utf-8")
    assert tokenizer.decode(vocab.split(text.encode("utf-8"))) == text
    entries = [{"token": "", "bytes": list(vocab.id_bytes[i]), "logprob": -0.1, "top_logprobs": [
        {"token": "", "bytes": list(vocab.id_bytes[i]), "logprob": -0.1}]} for i in ids]
    answer, topk_ids, topk_lp, tail = sparse_target(entries, vocab, 4)
    assert answer == ids and topk_ids.shape == (len(ids), 4)
    assert (topk_ids[:, 0] == np.asarray(ids)).all() and np.isneginf(topk_lp[:, 1:].astype(np.float32)).all()
    assert all(len(set(row)) == 4 for row in topk_ids.tolist())  # padding never repeats an id
    assert np.allclose(np.exp(tail), 1 - np.exp(-0.1), atol=1e-4)
    foreign = [{"token": "x", "bytes": [0xF0, 0x9F], "id": ids[0], "logprob": -1.0, "top_logprobs": []}]
    assert sparse_target(foreign, vocab, 4) is None  # an id whose bytes disagree: another vocabulary


def test_llamacpp_backend_serves_a_gguf_for_the_stage_and_stops_it(tmp_path):
    import psutil

    recipe = build_recipe({
        "run": {"name": "gguf", "runs_dir": str(tmp_path / "runs")},
        "teacher": {"backend": "llamacpp", "model": "embedded", "concurrency": 2},
        "generate": {"limit_per_source": 2, "max_new_tokens": 8, "top_k_logprobs": 4},
    }, "<llamacpp test recipe>")
    assert not recipe.scrubs_pii  # local, seed files: nothing leaves the machine
    run = run_recipe(recipe, only="generate")
    samples = stored(run)
    assert len(samples) == 4 and all(s.topk_ids is not None and s.topk_ids.shape[1] == 4 for s in samples)
    ours = [c for c in psutil.Process().children(recursive=True)  # not the module's shared server
            if "SmolLM2-135M-Instruct-Q4_1" in c.cmdline() and "edgedistill.models.llamacpp" in c.cmdline()]
    assert all(c.status() == psutil.STATUS_ZOMBIE for c in ours), ours


def test_a_stage_killed_with_9_leaves_no_llamacpp_server_behind(tmp_path):
    import os
    import signal
    import time

    import psutil

    script = ("from edgedistill.models.llamacpp import start_llamacpp_server\n"
              "from edgedistill.models.hf import embedded_gguf_path\n"
              "server = start_llamacpp_server(embedded_gguf_path(), parallel=1, ctx_per_slot=512, threads=1)\n"
              "print(server.process.pid, flush=True)\n"
              "import time; time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=subprocess_env())
    server_pid = int(parent.stdout.readline())
    assert psutil.pid_exists(server_pid)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 15
    while psutil.pid_exists(server_pid) and psutil.Process(server_pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the server outlived its killed parent"
        time.sleep(0.2)
