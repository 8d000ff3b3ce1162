"""`edgedistill serve RUN|MODEL.gguf`: pick the model file, refuse unsafe settings, take the
port, start the engine (llama.cpp or transformers, each with a random key of its own) and the
front (uvicorn), and stop both together."""

from __future__ import annotations

import errno
import logging
import os
import secrets
import socket
from pathlib import Path
from typing import NamedTuple

from edgedistill.errors import UserError
from edgedistill.net import bind_listener, host_url, is_loopback
from edgedistill.recipe import GGUF_TYPES

# The file a run serves by default: small, and near-lossless for small models (docs/BENCHMARKS.md).
PREFERRED = tuple(t for t in GGUF_TYPES if t.startswith("q")) + tuple(t for t in GGUF_TYPES if not t.startswith("q"))


ENGINES = ("auto", "llamacpp", "transformers")


class ServedModel(NamedTuple):
    engine: str  # "llamacpp" (a .gguf file) or "transformers" (a HF model folder)
    path: Path
    model_id: str


def _hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def resolve_model(target: str, engine: str = "auto") -> ServedModel:
    """What to serve, and with which engine, from a run folder, a .gguf file, a HF model folder
    or 'embedded'. A run serves its exported GGUF (llama.cpp is 4.5-7x faster on a CPU) and
    falls back to its HF student when nothing is exported yet; `engine` forces one."""
    if engine not in ENGINES:
        raise UserError(f"--engine {engine}: choose one of {', '.join(ENGINES)}")
    if target == "embedded":
        from edgedistill.models.hf import EMBEDDED_ID, embedded_gguf_path

        if engine == "transformers":
            raise UserError("embedded: the embedded teacher is a GGUF file — serve it with --engine llamacpp")
        return ServedModel("llamacpp", embedded_gguf_path(), EMBEDDED_ID)
    path = Path(target).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"{path}: GGUF file not found")
        if engine == "transformers":
            raise UserError(f"{path}: a GGUF file runs on llama.cpp — drop --engine transformers")
        return ServedModel("llamacpp", path, path.stem)
    if not path.is_dir():
        raise UserError(f"{path}: not a run folder, a HF model folder or a .gguf file")
    if _hf_folder(path) and not (path / "run.db").is_file():  # a plain HF model folder
        if engine == "llamacpp":
            raise UserError(f"{path}: a HF folder — export it to GGUF first, or use --engine transformers")
        return ServedModel("transformers", path, path.name)
    student = path / "student"
    if engine != "transformers":
        files = {f.stem.rsplit("-", 1)[-1]: f for f in (path / "export").glob("*.gguf")}
        for kind in PREFERRED:
            if kind in files:
                return ServedModel("llamacpp", files[kind], path.name)
        if engine == "llamacpp":
            raise UserError(f"{path}: no GGUF yet — run `edgedistill export {path}` first")
    if _hf_folder(student):
        return ServedModel("transformers", student, path.name)
    raise UserError(f"{path}: not a run folder with a trained student (no student/config.json, no export/*.gguf)")


def draft_for(draft: str | None, served: ServedModel):
    """`--draft RUN`: the run's student GGUF (the file a run serves) as the speculative-decoding
    draft of the served model — the teacher kept on-prem, answering faster where the student agrees."""
    if draft is None:
        return None
    from edgedistill.models.llamacpp import DraftSettings

    if served.engine != "llamacpp":
        raise UserError("--draft: speculative decoding runs in llama.cpp — serve a .gguf file, a run's GGUF or "
                        "'embedded'")
    return DraftSettings(resolve_model(draft, "llamacpp").path)


def api_key(env_name: str | None, host: str) -> str | None:
    """The key from the named variable; required whenever the server listens beyond loopback."""
    key = os.environ.get(env_name) if env_name else None
    if env_name and not key:
        raise UserError(f"--api-key-env: environment variable {env_name} is not set")
    if not key and not is_loopback(host_url(host)):
        raise UserError(f"--host {host}: the server would be reachable from other machines — set an API key "
                        "with --api-key-env NAME (or keep the default host 127.0.0.1)")
    return key


def listen(host: str, port: int) -> socket.socket:
    """The front's socket, taken before the model loads: a busy port is one line at once, not
    uvicorn's `[Errno 98]` after the model has loaded (issue #20)."""
    try:
        return bind_listener(host, port)
    except socket.gaierror:
        raise UserError(f"--host {host}: not a host name or address this machine can resolve") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UserError(f"--port {port}: {host_url(host, port)} is already in use — stop what listens there "
                            "or choose another --port") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"--host {host}: not an address of this machine") from None
        raise UserError(f"cannot listen on {host_url(host, port)}: {exc.strerror}") from None


def run_server(target: str, *, host: str = "127.0.0.1", port: int = 8000, api_key_env: str | None = None,
               engine: str = "auto", parallel: int = 2, queue_size: int = 16, max_tokens: int = 2048,
               context_per_slot: int = 4096, threads: int = 2, log_content: bool = False,
               exact: bool = False, policy: str | None = None, draft: str | None = None) -> None:
    import uvicorn

    from edgedistill.serve.app import ServeSettings, create_app

    key = api_key(api_key_env, host)
    served = resolve_model(target, engine)
    usage_policy = None
    if policy is not None:
        from edgedistill.serve.policy import load_policy

        usage_policy = load_policy(policy)
    draft_settings = draft_for(draft, served)
    listener = listen(host, port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per engine call: echo makes one per token
    engine_key = secrets.token_urlsafe(32)  # the engine's own: only the front can reach it
    try:
        if served.engine == "llamacpp":
            from edgedistill.models.llamacpp import (
                ReasoningOptions,
                start_llamacpp_server,
            )

            # A thinking template's trace comes back in `reasoning_content`, apart from the answer.
            runtime = start_llamacpp_server(served.path, parallel=parallel, ctx_per_slot=context_per_slot,
                                            threads=threads, alias=served.model_id, exact=exact, api_key=engine_key,
                                            reasoning=ReasoningOptions("deepseek"), draft=draft_settings)
        else:  # one request computes at a time in the transformers engine; the rest wait in the front's queue
            from edgedistill.serve.hf_engine import start_hf_engine

            runtime = start_hf_engine(served.path, alias=served.model_id, threads=threads, api_key=engine_key)
            queue_size, parallel = queue_size + parallel - 1, 1
    except BaseException:
        listener.close()
        raise
    with runtime, listener:
        settings = ServeSettings(model_id=served.model_id, upstream=host_url(runtime.host, runtime.port),
                                 api_key=key, engine=served.engine, upstream_key=runtime.api_key,
                                 max_tokens_cap=max_tokens, parallel=parallel, queue_size=queue_size,
                                 log_content=log_content, policy=usage_policy)
        logging.getLogger("edgedistill.serve").info("serving %s (%s, %s) on %s", served.model_id,
                                                    served.path.name, served.engine, host_url(host, port))
        config = uvicorn.Config(create_app(settings), log_level="warning", access_log=False)
        uvicorn.Server(config).run(sockets=[listener])
