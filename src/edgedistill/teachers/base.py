"""One teacher interface, several backends, chosen by name from the recipe.

A backend is a file that registers a factory with `@register_backend("name")`; adding one
needs no edit to a dispatcher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from edgedistill.errors import UserError
from edgedistill.models.hf import Completion, Messages
from edgedistill.recipe import GenerateCfg, TeacherCfg


@dataclass
class Usage:
    """What a teacher was asked and what it cost, accumulated over a stage (the cost ledger).

    `requests` counts prompts asked (a batch of 16 is 16), `retries` the extra attempts,
    `failures` the prompts given up after the last retry (not stored; a rerun asks again).
    """

    requests: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    text_only: int = 0  # answers whose tokens did not map onto the local vocabulary
    reasoning_tokens: int = 0  # trace tokens, part of completion_tokens (the server's count when it gives one)
    forced_rows: int = 0  # trace/answer tokens a thinking budget forced: stored with CE targets


@dataclass(frozen=True)
class Sampling:
    """Decoding settings of one call; `top_k_logprobs=None` asks for text only."""

    max_new_tokens: int
    temperature: float
    top_k_logprobs: int | None


class Teacher(Protocol):
    """What every backend offers: a stable id for the store, batched chat, and its usage.

    `sampling=None` means the recipe's generate settings (answers with their sparse targets);
    the Self-Instruct bootstrap passes its own (longer, sampled, text only). An entry is None
    when that prompt failed after every retry: it is counted, never stored as data. A backend
    that holds resources (a server process) may also offer `close()`; the stage calls it.
    """

    model_id: str
    usage: Usage

    def chat(self, batch: list[Messages], sampling: Sampling | None = None) -> list[Completion | None]: ...


def template_kwargs(cfg: TeacherCfg) -> dict | None:
    """What the chat template is told besides the messages: gpt-oss's reads `reasoning_effort`
    (its system turn says 'Reasoning: low'), so prompt ids follow the recipe's effort."""
    return {"reasoning_effort": cfg.reasoning_effort} if cfg.reasoning_effort else None


TeacherFactory = Callable[[TeacherCfg, GenerateCfg], Teacher]
_BACKENDS: dict[str, TeacherFactory] = {}


def register_backend(name: str) -> Callable[[TeacherFactory], TeacherFactory]:
    def deco(factory: TeacherFactory) -> TeacherFactory:
        _BACKENDS[name] = factory
        return factory
    return deco


def build_teacher(teacher_cfg: TeacherCfg, gen_cfg: GenerateCfg) -> Teacher:
    try:
        factory = _BACKENDS[teacher_cfg.backend]
    except KeyError:
        raise UserError(f"teacher.backend: unknown backend '{teacher_cfg.backend}' "
                        f"(available: {', '.join(sorted(_BACKENDS))})") from None
    return factory(teacher_cfg, gen_cfg)
