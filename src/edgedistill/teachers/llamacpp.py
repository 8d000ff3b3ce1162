"""The `llamacpp` teacher: a local GGUF (or 'embedded') served by llama.cpp for this stage only.

Why a backend of its own: on a CPU llama.cpp decodes a quantised GGUF several times faster
than transformers runs the de-quantised copy (measured in docs/BENCHMARKS.md,
bench/generate_throughput.py), and it reads GGUFs that transformers cannot de-quantise. The
server (models/llamacpp.py) is started on a free loopback port and stopped with the teacher;
talking to it goes through the `openai` backend, so retries, token-id mapping and the cost
ledger are the same code. The tokenizer defaults to the model's own.
"""

from __future__ import annotations

import weakref

from edgedistill.models.hf import resolve_source
from edgedistill.recipe import GenerateCfg, TeacherCfg
from edgedistill.teachers.base import register_backend
from edgedistill.teachers.openai_compat import OpenAITeacher


def context_per_slot(gen_cfg: GenerateCfg) -> int:
    """Room for a prompt (up to 1024 tokens) and the longest answer either phase asks for."""
    longest = max(gen_cfg.max_new_tokens, gen_cfg.bootstrap_max_new_tokens)
    return 1024 * (1 + -(-longest // 1024))


@register_backend("llamacpp")
def _make_llamacpp_teacher(teacher_cfg: TeacherCfg, gen_cfg: GenerateCfg) -> OpenAITeacher:
    from edgedistill.models.llamacpp import ReasoningOptions, start_llamacpp_server

    source = resolve_source(teacher_cfg.model)
    if source.gguf_file is None:
        from edgedistill.errors import UserError

        raise UserError(f"teacher.model: {source.folder} is not a .gguf file — the llamacpp backend serves "
                        "GGUF models (use backend = \"hf\" for a transformers folder)")
    # A thinking template's trace comes back in reasoning_content, apart from the answer.
    reasoning = ReasoningOptions("deepseek", teacher_cfg.reasoning_budget, teacher_cfg.reasoning_budget_message)
    server = start_llamacpp_server(source.folder / source.gguf_file, parallel=teacher_cfg.concurrency,
                                   ctx_per_slot=context_per_slot(gen_cfg), alias=source.model_id, reasoning=reasoning)
    served = teacher_cfg.model_copy(update={
        "base_url": server.base_url, "model": source.model_id, "api_key_env": None,
        # A local server is slow only when its slots are busy: long Self-Instruct answers at 4
        # slots on 2 cores took over 120 s here (counted as retries), so wait longer.
        "timeout_s": max(teacher_cfg.timeout_s, 600.0),
        "tokenizer": teacher_cfg.tokenizer or teacher_cfg.model})
    try:
        teacher = OpenAITeacher(served, gen_cfg)
    except BaseException:
        server.stop()
        raise
    teacher.on_close.append(server.stop)
    weakref.finalize(teacher, server.stop)  # also if nobody calls close(): at collection or exit
    return teacher
