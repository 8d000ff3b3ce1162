"""`edgedistill serve RUN|MODEL.gguf`: pick the model file, refuse unsafe settings, start
llama.cpp and the front (uvicorn), and stop both together."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

from edgedistill.errors import UserError
from edgedistill.net import is_loopback
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
    if not key and not is_loopback(f"http://{host}"):
        raise UserError(f"--host {host}: the server would be reachable from other machines — set an API key "
                        "with --api-key-env NAME (or keep the default host 127.0.0.1)")
    return key


def run_server(target: str, *, host: str = "127.0.0.1", port: int = 8000, api_key_env: str | None = None,
               engine: str = "auto", parallel: int = 2, queue_size: int = 16, max_tokens: int = 2048,
               context_per_slot: int = 4096, threads: int = 2, log_content: bool = False,
               draft: str | None = None) -> None:
    import uvicorn

    from edgedistill.serve.app import ServeSettings, create_app

    key = api_key(api_key_env, host)
    served = resolve_model(target, engine)
    draft_settings = draft_for(draft, served)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if served.engine == "llamacpp":
        from edgedistill.models.llamacpp import start_llamacpp_server

        runtime = start_llamacpp_server(served.path, parallel=parallel, ctx_per_slot=context_per_slot,
                                        threads=threads, alias=served.model_id, draft=draft_settings)
    else:  # one request computes at a time in the transformers engine; the rest wait in the front's queue
        from edgedistill.serve.hf_engine import start_hf_engine

        runtime = start_hf_engine(served.path, alias=served.model_id, threads=threads)
        queue_size, parallel = queue_size + parallel - 1, 1
    with runtime:
        settings = ServeSettings(model_id=served.model_id, upstream=f"http://{runtime.host}:{runtime.port}",
                                 api_key=key, max_tokens_cap=max_tokens, parallel=parallel, queue_size=queue_size,
                                 log_content=log_content)
        logging.getLogger("edgedistill.serve").info("serving %s (%s, %s) on http://%s:%d", served.model_id,
                                                    served.path.name, served.engine, host, port)
        uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", access_log=False)
