"""A loopback HTTP server that answers `/v1/chat/completions` with recorded response bodies, for
testing the `openai` teacher against what real servers send (tests/data/reasoning/: each file
says where it comes from). Bodies are answered in order, the last one repeating; every request
body is kept, so tests can check what was asked."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FIXTURES = Path(__file__).parent / "data" / "reasoning"


def recorded(name: str) -> tuple[str, bytes]:
    """(content type, body) of a fixture: the `response` of a .json file, a .sse file as it is
    (its provenance is in SSE comment lines, which clients skip)."""
    path = FIXTURES / name
    if path.suffix == ".sse":
        return "text/event-stream", path.read_bytes()
    return "application/json", json.dumps(json.loads(path.read_text(encoding="utf-8"))["response"]).encode()


class ReplayServer:
    """`with ReplayServer("vllm-r1.json") as server:` → `server.base_url` (ends in /v1), `server.requests`.
    `answer=`: a function of the request body (and how many requests came before) giving
    (content type, body), for a scripted server instead of recorded bodies."""

    def __init__(self, *names: str, answer=None):
        self.answers = [recorded(n) for n in names]
        self.answer = answer
        self.requests: list[dict] = []
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 — the teacher's probe of /v1/models: an empty list
                payload = b'{"object": "list", "data": []}'
                self.send_response(200 if self.path.endswith("/models") else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with lock:
                    outer.requests.append(body)
                    if outer.answer is not None:
                        kind, payload = outer.answer(body, len(outer.requests) - 1)
                    else:
                        kind, payload = outer.answers[min(len(outer.requests), len(outer.answers)) - 1]
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> ReplayServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def scripted_body(tokenizer, trace: str | None, answer: str, finish: str = "stop", k: int = 2,
                  logprobs: bool = True) -> tuple[str, bytes]:
    """A llama.cpp-shaped chat completion (the layout of the recorded llamacpp-*.json) for a trace
    and an answer on a local vocabulary: `reasoning_content`, `content`, and logprob entries with
    ids for the trace, the `</think>` and blank-line tokens, the answer, and the end of turn. Each
    chosen token heads its top list at -0.1, the next id follows at -2.5."""
    from edgedistill.models.vocab import VocabMap

    id_bytes = VocabMap(tokenizer).id_bytes

    def entries(text: str) -> list[dict]:
        out = []
        for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
            other = (token + 1) % len(tokenizer)
            out.append({"id": token, "token": id_bytes[token].decode("utf-8", "replace"), "bytes": list(id_bytes[token]),
                        "logprob": -0.1, "top_logprobs": [
                            {"id": token, "token": "", "bytes": list(id_bytes[token]), "logprob": -0.1},
                            {"id": other, "token": "", "bytes": list(id_bytes[other]), "logprob": -2.5}][:k]})
        return out

    listed = (entries(trace) + entries("</think>\n\n") if trace is not None else []) + entries(answer)
    if finish == "stop":
        listed.append({"id": tokenizer.eos_token_id, "token": "", "bytes": [], "logprob": -0.05, "top_logprobs": [
            {"id": tokenizer.eos_token_id, "token": "", "bytes": [], "logprob": -0.05}]})
    message = {"role": "assistant", "content": answer} | ({"reasoning_content": trace} if trace is not None else {})
    choice = {"index": 0, "finish_reason": finish, "message": message}
    if logprobs:
        choice["logprobs"] = {"content": listed}
    body = {"choices": [choice], "object": "chat.completion", "model": "scripted",
            "usage": {"prompt_tokens": 10, "completion_tokens": len(listed), "total_tokens": 10 + len(listed)}}
    return "application/json", json.dumps(body).encode()
