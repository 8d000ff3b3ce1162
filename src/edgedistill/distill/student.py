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
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from edgedistill.data.store import Sample
from edgedistill.errors import UserError
from edgedistill.run import publish_mode
from edgedistill.teachers.hf import hidden_states

# Architectures whose decoder stack is `model.model.layers` with per-layer config lists we know.
CUTTABLE = {"llama", "mistral", "qwen2", "qwen3"}


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


def check_cut(model_type: str, n_layers: int, keep: int) -> None:
    """The cut is possible: a known decoder stack, and fewer layers kept than the teacher has."""
    if model_type not in CUTTABLE:
        raise UserError(f"teacher architecture '{model_type}' cannot be cut into a student yet "
                        f"(supported: {', '.join(sorted(CUTTABLE))})")
    if not 1 <= keep < n_layers:
        raise UserError(f"student.keep_layers: must be between 1 and {n_layers - 1} for this "
                        f"{n_layers}-layer teacher (got {keep})")


def choose_layers(model, strategy: str, keep: int, samples: Sequence[Sample]) -> tuple[list[int], list[float]]:
    n_layers = model.config.num_hidden_layers
    check_cut(model.config.model_type, n_layers, keep)
    if strategy == "even":
        return even_layers(n_layers, keep), []
    if not samples:
        raise UserError(f"student.strategy '{strategy}' measures the distill set, which has no training samples")
    states = boundary_states(model, samples)
    measure = angular_block if strategy == "angular" else block_influence
    return measure(states, n_layers - keep)


def _cut_config(config, kept: list[int]):
    cut = copy.deepcopy(config)
    cut.num_hidden_layers = len(kept)
    for name in ("layer_types",):  # per-layer lists (Qwen2/3 sliding window) follow the kept layers
        values = getattr(cut, name, None)
        if isinstance(values, list) and len(values) == config.num_hidden_layers:
            setattr(cut, name, [values[i] for i in kept])
    if getattr(cut, "max_window_layers", None) is not None:
        cut.max_window_layers = min(cut.max_window_layers, len(kept))
    return cut


def cut_student(teacher, kept: list[int]):
    """A new model holding exactly the teacher's kept layers (renumbered), embeddings, norm and head."""
    from transformers import AutoModelForCausalLM

    check_cut(teacher.config.model_type, teacher.config.num_hidden_layers, len(kept))
    student = AutoModelForCausalLM.from_config(_cut_config(teacher.config, kept), dtype=teacher.dtype)
    renumber = {old: new for new, old in enumerate(kept)}
    state = {}
    for key, tensor in teacher.state_dict().items():
        if key.startswith("model.layers."):
            index = int(key.split(".")[2])
            if index not in renumber:
                continue
            key = key.replace(f"model.layers.{index}.", f"model.layers.{renumber[index]}.", 1)
        state[key] = tensor.detach().clone()
    student.load_state_dict(state, strict=True)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student


def count_parameters(model) -> int:
    """Unique parameters (tied embedding and head counted once)."""
    return sum(p.numel() for p in model.parameters())


def save_model(model, tokenizer, target: Path, extra: dict | None = None) -> None:
    """save_pretrained (safetensors) + tokenizer + chat template, into a temp folder then renamed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if extra is not None:
        (tmp / "edgedistill.json").write_text(json.dumps(extra, indent=2), encoding="utf-8")
    publish_mode(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
