"""llama.cpp's own OpenAI-compatible HTTP server for a GGUF, through `xllamacpp`, in a child process.

Why xllamacpp (not llama-cpp-python): it ships prebuilt manylinux wheels built without
`-march=native`, so it installs in seconds and runs on CPUs without AMX/AVX-512 (measured
here: no SIGILL, ~70 tokens/s decode on the embedded SmolLM2 Q4_1), and it embeds llama.cpp's
real server — continuous batching, parallel slots, `logprobs`/`top_logprobs` with token ids —
rather than a Python re-implementation. llama-cpp-python builds from source (6-8 minutes)
and its native build executes AMX instructions that SIGILL on this machine.

Why a child process: the server runs on C++ threads inside the interpreter and has no stop
call; dropping it waits for every open request, and a client in the same process can
deadlock it. A process is stopped with a signal, whatever is in flight, and it exits by
itself when its parent is gone (a `kill -9` of the stage leaves no server behind).

A server may be given an API key (llama.cpp's `api_keys`: every route but /health then wants
`Authorization: Bearer <key>`). The key reaches the child through its environment, never its
command line, which `ps` shows to every user of the machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from edgedistill.errors import UserError
from edgedistill.net import free_port

ENGINE_KEY_ENV = "EDGEDISTILL_ENGINE_KEY"  # the child server's key, read and removed at its start


def exit_with_parent(parent: int) -> None:
    """A server started for a stage must not outlive it, even if it is killed with -9."""
    import os
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


REASONING_FORMATS = ("deepseek", "deepseek-legacy", "none", "auto")


@dataclass(frozen=True)
class ReasoningOptions:
    """llama.cpp's reasoning knobs. `format` 'deepseek' puts a thinking template's trace in
    `message.reasoning_content` (the default of this build, set explicitly so a runtime with
    another default answers the same), 'none' leaves it in the content. `budget`: most trace
    tokens, then the server forces `message` and the end tag (--reasoning-budget; measured:
    0 does nothing in xllamacpp 2026.10, so at least 1)."""

    format: str = "deepseek"
    budget: int | None = None
    message: str | None = None

    def args(self) -> list[str]:
        return (["--reasoning-format", self.format] + (["--reasoning-budget", str(self.budget)] if self.budget else [])
                + (["--reasoning-budget-message", self.message] if self.message else []))


def _set_reasoning(params, options: ReasoningOptions) -> None:
    """The knobs on xllamacpp's CommonParams (2026.10: the budget lives in `sampling`)."""
    import xllamacpp

    formats = xllamacpp.common_reasoning_format
    params.reasoning_format = {"deepseek": formats.COMMON_REASONING_FORMAT_DEEPSEEK,
                               "deepseek-legacy": formats.COMMON_REASONING_FORMAT_DEEPSEEK_LEGACY,
                               "none": formats.COMMON_REASONING_FORMAT_NONE,
                               "auto": formats.COMMON_REASONING_FORMAT_AUTO}[options.format]
    if options.budget is not None:
        params.sampling.reasoning_budget_tokens = options.budget
    if options.message:
        params.sampling.reasoning_budget_message = options.message


@dataclass(frozen=True)
class DraftSettings:
    """Speculative decoding: a small model of the same vocabulary proposes up to `n_max` tokens,
    the served model verifies them in one batch (llama-server's --model-draft, --draft-max,
    --draft-min, --draft-p-min). Greedy output is unchanged; responses then carry
    `timings.draft_n` and `timings.draft_n_accepted`."""

    path: Path
    n_max: int = 8
    n_min: int = 0
    p_min: float = 0.0  # stop drafting when the draft's own top probability falls below this

    def args(self) -> list[str]:
        return ["--draft", str(self.path), "--draft-max", str(self.n_max), "--draft-min", str(self.n_min),
                "--draft-p-min", str(self.p_min)]


def _set_draft(params, draft: DraftSettings, threads: int) -> None:
    import xllamacpp

    settings = params.speculative.draft
    settings.mparams.path = str(draft.path)
    settings.n_max, settings.n_min, settings.p_min = draft.n_max, draft.n_min, draft.p_min
    settings.n_gpu_layers = 0
    settings.cpuparams.n_threads = settings.cpuparams_batch.n_threads = threads
    # Without a speculative type the server loads the draft and never drafts (xllamacpp 2026.10).
    params.speculative.types = [xllamacpp.common_speculative_type.COMMON_SPECULATIVE_TYPE_DRAFT_SIMPLE]


def _serve(gguf: str, host: str, port: int, parallel: int, ctx_per_slot: int, threads: int, alias: str,
           parent: int | None = None, exact: bool = False, reasoning: ReasoningOptions | None = None,
           draft: DraftSettings | None = None) -> None:
    import threading

    import xllamacpp

    if parent:
        exit_with_parent(parent)

    params = xllamacpp.CommonParams()
    params.model.path = gguf
    params.n_parallel = parallel
    params.n_ctx = ctx_per_slot * parallel  # llama.cpp splits the context across slots
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.hostnames = [host]
    params.port = port
    params.model_alias = {alias}
    params.verbosity = 0  # no request text in logs
    key = os.environ.pop(ENGINE_KEY_ENV, None)
    if key:
        params.api_keys = [key]
    if exact:  # F32 KV cache, no flash attention (which rounds through F16 on CPU)
        params.cache_type_k = params.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_F32
        params.flash_attn_type = xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
    _set_reasoning(params, reasoning or ReasoningOptions())
    if draft is not None:
        _set_draft(params, draft, threads)
    server = xllamacpp.Server(params)  # noqa: F841  (kept alive until the process is stopped)
    threading.Event().wait()


@dataclass
class LlamaCppServer:
    """A running server; `base_url` ends in /v1, as the openai backend expects."""

    process: subprocess.Popen
    host: str
    port: int
    api_key: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def __enter__(self) -> LlamaCppServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_llamacpp_server(gguf: Path, *, port: int | None = None, host: str = "127.0.0.1", parallel: int = 4,
                          ctx_per_slot: int = 2048, threads: int = 2, alias: str = "model",
                          ready_timeout_s: float = 120.0, exact: bool = False,
                          api_key: str | None = None, reasoning: ReasoningOptions | None = None,
                          draft: DraftSettings | None = None) -> LlamaCppServer:
    """Start the server in a child process and return once /health answers 200.

    `exact` keeps attention in float32 (F32 KV cache, no flash attention): an F32 GGUF then
    agrees with transformers within the 1e-4 log-prob that tests/test_export.py asserts (the
    defaults drift up to ~0.01), for checking a conversion; slower and twice the KV memory, so
    never the default. With `api_key` the server answers only requests that carry it. `draft`
    serves it with a draft model (speculative decoding)."""
    for path in (gguf, draft.path) if draft else (gguf,):
        if not path.is_file():
            raise UserError(f"{path}: GGUF file not found")
    if importlib.util.find_spec("xllamacpp") is None:
        raise UserError("the llama.cpp runtime is missing — `pip install xllamacpp` (or `make setup`)")
    port = port or free_port()
    command = [sys.executable, "-m", "edgedistill.models.llamacpp", str(gguf), "--host", host, "--port", str(port),
               "--parallel", str(parallel), "--ctx-per-slot", str(ctx_per_slot), "--threads", str(threads),
               "--alias", alias, "--parent", str(os.getpid())] + (["--exact"] if exact else []) + \
        (draft.args() if draft else [])
    command += (reasoning or ReasoningOptions()).args()
    return spawn_server(command, host, port, f"{gguf}: llama.cpp", ready_timeout_s, api_key)


def spawn_server(command: list[str], host: str, port: int, what: str, ready_timeout_s: float,
                 api_key: str | None = None) -> LlamaCppServer:
    """Start a server process and return once its /health answers 200; `what` names it in errors."""
    env = {name: value for name, value in os.environ.items() if name != ENGINE_KEY_ENV}
    if api_key:
        env[ENGINE_KEY_ENV] = api_key
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=env)
    server = LlamaCppServer(process, host, port, api_key)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://{host}:{port}/health", timeout=2, trust_env=False).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            lines = process.stderr.read().decode("utf-8", "replace").strip().splitlines() or ["no output"]
            last = next((line for line in reversed(lines) if line.startswith("error: ")), lines[-1])
            raise UserError(f"{what} could not serve this model (exit {process.returncode}: {last})")
        time.sleep(0.1)
    server.stop()
    raise UserError(f"{what} server not ready after {ready_timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    """`python -m edgedistill.models.llamacpp MODEL.gguf --port N`: serve in the foreground until stopped."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--ctx-per-slot", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--alias", default="model")
    parser.add_argument("--parent", type=int, default=None, help="Exit when this process is gone.")
    parser.add_argument("--exact", action="store_true", help="Float32 attention (F32 KV, no flash attention).")
    parser.add_argument("--reasoning-format", choices=REASONING_FORMATS, default="deepseek",
                        help="Where a thinking template's trace goes (deepseek: message.reasoning_content).")
    parser.add_argument("--reasoning-budget", type=int, default=None, help="Most trace tokens (then forced to end).")
    parser.add_argument("--reasoning-budget-message", default=None, help="Text injected before the forced end.")
    parser.add_argument("--draft", type=Path, default=None, help="Draft model GGUF (speculative decoding).")
    parser.add_argument("--draft-max", type=int, default=8)
    parser.add_argument("--draft-min", type=int, default=0)
    parser.add_argument("--draft-p-min", type=float, default=0.0)
    args = parser.parse_args(argv)
    draft = DraftSettings(args.draft, args.draft_max, args.draft_min, args.draft_p_min) if args.draft else None
    reasoning = ReasoningOptions(args.reasoning_format, args.reasoning_budget, args.reasoning_budget_message)
    try:
        _serve(str(args.gguf), args.host, args.port, args.parallel, args.ctx_per_slot, args.threads, args.alias,
               args.parent, args.exact, reasoning, draft)
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:  # xllamacpp's one error: bad file, port in use
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
