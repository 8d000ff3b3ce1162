"""The `hf` teacher: a local transformers model (folder or .gguf), white-box.

Top-k log-probabilities and the exact tail come from the logits `generate` already computes
(models/hf.py, `generate_batch`): no second forward pass. A reasoning checkpoint's trace
(`<think>` tags or gpt-oss harmony channels, read from its chat template) is split from the
answer there, each with its own rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

from edgedistill.models.hf import Completion, Messages, generate_batch, load_causal_lm
from edgedistill.recipe import GenerateCfg, TeacherCfg
from edgedistill.teachers.base import Sampling, Usage, register_backend, template_kwargs


class HFTeacher:
    """A transformers model answering in batches with its chat template."""

    def __init__(self, teacher_cfg: TeacherCfg, gen_cfg: GenerateCfg):
        started = time.perf_counter()
        self.model, self.tokenizer, source = load_causal_lm(teacher_cfg.model, teacher_cfg.dtype)
        self.model_id = source.model_id
        self.gen_cfg = gen_cfg
        self.usage = Usage()
        self.template_kwargs = template_kwargs(teacher_cfg)
        self.load_seconds = time.perf_counter() - started
        logging.getLogger(__name__).info("loaded %s in %.1f s", self.model_id, self.load_seconds)

    def chat(self, batch: list[Messages], sampling: Sampling | None = None) -> list[Completion | None]:
        s = sampling or Sampling(self.gen_cfg.max_new_tokens, self.gen_cfg.temperature, self.gen_cfg.top_k_logprobs)
        # Sampled targets are seeded by the prompts, so a resumed run draws what it would have drawn.
        seed = int(hashlib.sha256(json.dumps(batch, ensure_ascii=False).encode()).hexdigest()[:12], 16)
        completions = generate_batch(self.model, self.tokenizer, batch, max_new_tokens=s.max_new_tokens,
                                     temperature=s.temperature, top_k_logprobs=s.top_k_logprobs,
                                     sparse_target=self.gen_cfg.sparse_target if sampling is None else "topk",
                                     seed=seed, template_kwargs=self.template_kwargs)
        self.usage.requests += len(batch)
        self.usage.prompt_tokens += sum(len(c.prompt_ids) for c in completions)
        self.usage.completion_tokens += sum(c.generated_tokens for c in completions)
        self.usage.reasoning_tokens += sum(len(c.reasoning_ids) for c in completions)
        return list(completions)


@register_backend("hf")
def _make_hf_teacher(teacher_cfg: TeacherCfg, gen_cfg: GenerateCfg) -> HFTeacher:
    return HFTeacher(teacher_cfg, gen_cfg)
