"""One teacher interface, several backends, chosen by name from the recipe.

A backend is a file that registers a factory with `@register_backend("name")`; adding one
needs no edit to a dispatcher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edgedistill.errors import UserError
from edgedistill.recipe import GenerateCfg, TeacherCfg

Messages = list[dict[str, str]]


@dataclass
class Completion:
    """A teacher's answer to one prompt, with its sparse distribution per answer token.

    `topk_ids[t]` / `topk_logprobs[t]` are the teacher's k most likely tokens for answer token t
    (unprocessed logits, temperature 1) and `tail_logprobs[t]` is log of the mass outside them,
    so the k+1 buckets form a distribution (ARCHITECTURE.md, "Sparse KD target").
    """

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool  # ended on an end-of-turn token rather than the length limit
    topk_ids: np.ndarray | None = None  # (T, k) int32
    topk_logprobs: np.ndarray | None = None  # (T, k) float16
    tail_logprobs: np.ndarray | None = None  # (T,) float32


@dataclass(frozen=True)
class Sampling:
    """Decoding settings of one call; `top_k_logprobs=None` asks for text only."""

    max_new_tokens: int
    temperature: float
    top_k_logprobs: int | None


class Teacher(Protocol):
    """What every backend offers: a stable id for the store, and batched chat.

    `sampling=None` means the recipe's generate settings (answers with their sparse targets);
    the Self-Instruct bootstrap passes its own (longer, sampled, text only).
    """

    model_id: str

    def chat(self, batch: list[Messages], sampling: Sampling | None = None) -> list[Completion]: ...


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
