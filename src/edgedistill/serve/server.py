"""`edgedistill serve RUN|MODEL.gguf`: pick the model file, refuse unsafe settings, start
llama.cpp and the front (uvicorn), and stop both together."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from edgedistill.errors import UserError
from edgedistill.teachers.openai_compat import is_loopback

# The file a run serves by default: small, and near-lossless for small models (docs/BENCHMARKS.md).
PREFERRED = ("q8_0", "q4_k_m", "q5_k_m", "q6_k", "f16", "q4_0", "q4_1", "q5_0", "bf16", "f32")


def resolve_model(target: str) -> tuple[Path, str]:
    """(GGUF path, model id) from a run folder, a .gguf file or 'embedded'."""
    if target == "embedded":
        from edgedistill.teachers.hf import EMBEDDED_ID, embedded_gguf_path

        return embedded_gguf_path(), EMBEDDED_ID
    path = Path(target).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"{path}: GGUF file not found")
        return path, path.stem
    if not path.is_dir():
        raise UserError(f"{path}: not a run folder or a .gguf file")
    files = {f.stem.rsplit("-", 1)[-1]: f for f in (path / "export").glob("*.gguf")}
    for kind in PREFERRED:
        if kind in files:
            return files[kind], path.name
    if (path / "student" / "config.json").is_file():
        raise UserError(f"{path}: no GGUF yet — run `edgedistill export {path}` first (the server runs llama.cpp)")
    raise UserError(f"{path}: not a run folder with an exported model (no export/*.gguf)")


def api_key(env_name: str | None, host: str) -> str | None:
    """The key from the named variable; required whenever the server listens beyond loopback."""
    key = os.environ.get(env_name) if env_name else None
    if env_name and not key:
        raise UserError(f"--api-key-env: environment variable {env_name} is not set")
    if not key and not is_loopback(f"http://{host}"):
        raise UserError(f"--host {host}: the server would be reachable from other machines — set an API key "
                        "with --api-key-env NAME (or keep the default host 127.0.0.1)")
    return key


def run_server(target: str, *, host: str = "127.0.0.1", port: int = 8000, api_key_env: str | None = None,
               parallel: int = 2, queue_size: int = 16, max_tokens: int = 2048, context_per_slot: int = 4096,
               threads: int = 2, log_content: bool = False) -> None:
    import uvicorn

    from edgedistill.serve.app import ServeSettings, create_app
    from edgedistill.serve.llamacpp import start_llamacpp_server

    key = api_key(api_key_env, host)
    gguf, model_id = resolve_model(target)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with start_llamacpp_server(gguf, parallel=parallel, ctx_per_slot=context_per_slot, threads=threads,
                               alias=model_id) as runtime:
        settings = ServeSettings(model_id=model_id, upstream=f"http://{runtime.host}:{runtime.port}", api_key=key,
                                 max_tokens_cap=max_tokens, parallel=parallel, queue_size=queue_size,
                                 log_content=log_content)
        logging.getLogger("edgedistill.serve").info("serving %s (%s) on http://%s:%d", model_id, gguf.name, host, port)
        uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", access_log=False)
