"""Make the student: cut it from the teacher by keeping a subset of its decoder layers.

Embeddings, final norm, LM head and every kept layer are copied bit for bit; only the layer
count changes, so the student starts as close to the teacher as its size allows and the
tokenizers match exactly (logit KD needs the same vocabulary).

Which layers to drop is measured on the distill set:
- `even`: keep evenly spaced layers, first and last included.
- `angular`: drop the contiguous block of n layers whose input and output hidden states are
  closest in angle, arccos(cos)/pi averaged over tokens (Gromov et al. 2024, "The Unreasonable
  Ineffectiveness of the Deeper Layers"); the last layer is always kept.
- `block_influence`: drop the n layers with the lowest Block Influence 1 - cos(x_in, x_out)
  (Men et al. 2024, "ShortGPT"); the last layer is always kept.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from edgedistill.data.store import Sample
from edgedistill.errors import UserError
from edgedistill.models.families import (
    check_cuttable,
    cut_config,
    decoder_layers,
    shape_of,
)
from edgedistill.models.hf import hidden_states

STRATEGY_WORDS = {"even": "even spacing", "angular": "angular distance on the distill set (Gromov et al. 2024)",
                  "block_influence": "Block Influence on the distill set (ShortGPT)"}


def layer_ranges(kept: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0–2, 5, 7–8' (for the report and the model card)."""
    runs: list[list[int]] = []
    for index in kept:
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return ", ".join(f"{r[0]}–{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)


def even_layers(n_layers: int, keep: int) -> list[int]:
    if keep == 1:
        return [n_layers - 1]
    return sorted({round(i * (n_layers - 1) / (keep - 1)) for i in range(keep)})


@torch.inference_mode()
def boundary_states(model, samples: Sequence[Sample]) -> list[torch.Tensor]:
    """Hidden states at each layer boundary, tokens of all samples concatenated: L+1 of (N, H)."""
    per_layer: list[list[torch.Tensor]] = []
    for sample in samples:
        ids = torch.tensor(list(sample.prompt_ids) + list(sample.answer_ids), dtype=torch.long)[None]
        hidden = hidden_states(model, ids)  # L+1 of (1, T, H), no logits
        if not per_layer:
            per_layer = [[] for _ in hidden]
        for i, h in enumerate(hidden):
            per_layer[i].append(h[0].float())
    return [torch.cat(hs) for hs in per_layer]


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1.0, 1.0)


def angular_block(states: list[torch.Tensor], n_drop: int) -> tuple[list[int], list[float]]:
    """Start l of the block [l, l+n) minimising mean arccos(cos(x_l, x_{l+n}))/pi.

    `states[L]` is after the final norm in transformers, so blocks end at boundary L-1 at most:
    the last layer is kept.
    """
    n_layers = len(states) - 1
    scores = [float((torch.arccos(_cos(states[l], states[l + n_drop])) / torch.pi).mean())
              for l in range(0, n_layers - n_drop)]
    start = min(range(len(scores)), key=scores.__getitem__)
    dropped = set(range(start, start + n_drop))
    return [i for i in range(n_layers) if i not in dropped], scores


def block_influence(states: list[torch.Tensor], n_drop: int) -> tuple[list[int], list[float]]:
    n_layers = len(states) - 1
    scores = [float((1 - _cos(states[i], states[i + 1])).mean()) for i in range(n_layers - 1)]
    dropped = set(sorted(range(n_layers - 1), key=scores.__getitem__)[:n_drop])
    return [i for i in range(n_layers) if i not in dropped], scores


def choose_layers(model, strategy: str, keep: int, samples: Sequence[Sample]) -> tuple[list[int], list[float]]:
    n_layers = model.config.num_hidden_layers
    check_cuttable(shape_of(model.config), keep)
    if strategy == "even":
        return even_layers(n_layers, keep), []
    if not samples:
        raise UserError(f"student.strategy '{strategy}' measures the distill set, which has no training samples")
    states = boundary_states(model, samples)
    measure = angular_block if strategy == "angular" else block_influence
    return measure(states, n_layers - keep)


def cut_student(teacher, kept: list[int]):
    """A new model holding exactly the teacher's kept layers (renumbered), embeddings, norm and
    head, for any decoder-only family (models/families.py finds the stack and per-layer config)."""
    from transformers import AutoModelForCausalLM

    check_cuttable(shape_of(teacher.config), len(kept))
    prefix, _ = decoder_layers(teacher)
    student = AutoModelForCausalLM.from_config(cut_config(teacher.config, kept), dtype=teacher.dtype)
    renumber = {old: new for new, old in enumerate(kept)}
    state = {}
    for key, tensor in teacher.state_dict().items():
        if key.startswith(prefix + "."):
            index = int(key[len(prefix) + 1:].split(".")[0])
            if index not in renumber:
                continue
            key = f"{prefix}.{renumber[index]}{key[len(prefix) + 1 + len(str(index)):]}"
        state[key] = tensor.detach().clone()
    student.load_state_dict(state, strict=True)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student
