"""Turn distill-set samples into training batches: prompt+answer ids and the answer targets.

Only answer positions carry a loss, so the model computes hidden states for the whole
sequence but LM-head logits only where they are needed: for the 576-wide, 49k-vocabulary
SmolLM2 the head costs as much as ~8 decoder layers per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edgedistill.data.store import Sample
from edgedistill.models.hf import final_hidden


@dataclass
class Example:
    input_ids: np.ndarray  # (L,) prompt + answer, truncated
    n_prompt: int
    topk_ids: np.ndarray | None  # (A, k) for the A answer tokens kept
    topk_logprobs: np.ndarray | None
    tail_logprobs: np.ndarray | None


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) right padded
    attention_mask: torch.Tensor  # (B, T)
    positions: torch.Tensor  # (N,) flat indices into B*T of the positions that predict answer tokens
    labels: torch.Tensor  # (N,) the answer tokens
    topk_ids: torch.Tensor | None  # (N, k)
    topk_logprobs: torch.Tensor | None  # (N, k)
    tail_logprobs: torch.Tensor | None  # (N,)

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device) -> Batch:
        move = (lambda t: None if t is None else t.to(device))
        return Batch(*(move(getattr(self, f)) for f in ("input_ids", "attention_mask", "positions", "labels",
                                                         "topk_ids", "topk_logprobs", "tail_logprobs")))


def to_example(sample: Sample, max_seq_len: int) -> Example | None:
    """None when nothing of the answer fits in max_seq_len."""
    ids = np.concatenate([sample.prompt_ids, sample.answer_ids])[:max_seq_len]
    n_answer = len(ids) - len(sample.prompt_ids)
    if n_answer <= 0:
        return None
    cut = (lambda a: None if a is None else a[:n_answer])
    return Example(ids, len(sample.prompt_ids), cut(sample.topk_ids), cut(sample.topk_logprobs),
                   cut(sample.tail_logprobs))


def to_text_example(sample: Sample, tokenizer, max_seq_len: int) -> Example | None:
    """Sequence-level KD for a student with another vocabulary: the teacher's text through the
    student's own chat template and tokenizer (end of turn appended when the teacher stopped)."""
    from edgedistill.models.hf import encode_prompts

    prompt = encode_prompts(tokenizer, [sample.prompt_messages])[0]
    answer = tokenizer(sample.answer, add_special_tokens=False)["input_ids"]
    if sample.finished and tokenizer.eos_token_id is not None:
        answer.append(tokenizer.eos_token_id)
    ids = np.array(prompt + answer, dtype=np.int64)[:max_seq_len]
    if len(ids) <= len(prompt):
        return None
    return Example(ids, len(prompt), None, None, None)


def collate(examples: list[Example], pad_id: int) -> Batch:
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    positions = []
    for row, e in enumerate(examples):
        input_ids[row, :len(e.input_ids)] = torch.from_numpy(e.input_ids.astype(np.int64))
        mask[row, :len(e.input_ids)] = 1
        # logits at position p predict token p+1: answer token j sits at n_prompt+j.
        positions.append(row * width + np.arange(e.n_prompt - 1, len(e.input_ids) - 1))
    flat = torch.from_numpy(np.concatenate(positions))
    labels = input_ids.flatten()[flat + 1]
    has_topk = all(e.topk_ids is not None for e in examples)
    cat = (lambda name, dtype: torch.from_numpy(np.concatenate([getattr(e, name) for e in examples]).astype(dtype))
           if has_topk else None)
    return Batch(input_ids, mask, flat, labels, cat("topk_ids", np.int64), cat("topk_logprobs", np.float32),
                 cat("tail_logprobs", np.float32))


def answer_hidden(model, batch: Batch) -> torch.Tensor:
    """(N, H) final-normed hidden states at the positions that predict answer tokens.

    The forward goes through `model` itself (so accelerate's autocast and DDP wrappers apply)
    and keeps no logits: the LM head meets these states only where a loss is taken.
    """
    hidden = final_hidden(model, batch.input_ids, batch.attention_mask)  # (B, T, H)
    return hidden.flatten(0, 1)[batch.positions.to(hidden.device)]


def answer_logits(model, batch: Batch, head: torch.nn.Module | None = None) -> torch.Tensor:
    """(N, V) logits at the positions that predict answer tokens. `head` is the unwrapped
    model's output embedding when `model` is wrapped (DDP)."""
    return (head or model.get_output_embeddings())(answer_hidden(model, batch))
