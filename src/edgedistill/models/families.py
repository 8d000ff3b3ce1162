"""What the stages need to know about a model family, found from the model itself wherever
possible rather than from a list of names.

- The decoder stack: every decoder-only model transformers builds keeps its layers in one
  `ModuleList` of `config.num_hidden_layers` blocks (`model.layers` for Llama, Mistral, Qwen2/3,
  Gemma 3, Phi-3, SmolLM3, gpt-oss); a cut keeps some of them, renumbered.
- Per-layer configuration: lists in the config with one entry per layer (Gemma 3 and Qwen's
  `layer_types` — sliding vs full attention —, SmolLM3's `no_rope_layers`) follow the kept
  layers; `max_window_layers` is clipped.
- Mixture-of-experts models (gpt-oss, Qwen3-MoE, Mixtral) answer as teachers but are not cut:
  dropping whole MoE blocks is not what the cut strategies were measured on.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from edgedistill.errors import UserError

# Config fields that give a model experts (transformers' names across families).
EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")

# Gemma's published turn format (ai.google.dev/gemma/docs/core/prompt-structure): base Gemma 3
# checkpoints ship the turn tokens but no template. System text goes in as a user turn, as
# Gemma's own template folds it into the first user turn.
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
                  "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
                  "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


@dataclass(frozen=True)
class ModelShape:
    """What the preflight needs to know of a model before loading it."""

    model_type: str
    n_layers: int
    experts: int  # 0 for a dense model


def fallback_chat_template(tokenizer) -> str | None:
    """The published chat template of a base model's family, when its tokenizer has the turn
    tokens but no template (Gemma 3 270M base); None when there is no such family fact."""
    vocab = tokenizer.get_vocab()
    if "<start_of_turn>" in vocab and "<end_of_turn>" in vocab:
        return GEMMA_TEMPLATE
    return None


def shape_of(config) -> ModelShape:
    """A loaded model's config as the preflight sees an unloaded one (models/hf.model_shape)."""
    experts = max(int(getattr(config, name, 0) or 0) for name in EXPERT_FIELDS)
    return ModelShape(str(config.model_type), int(config.num_hidden_layers), experts)


def decoder_layers(model) -> tuple[str, torch.nn.ModuleList]:
    """The decoder stack and its state-dict prefix (e.g. 'model.layers'): the one ModuleList
    holding num_hidden_layers blocks (the shortest path if several, e.g. a vision tower)."""
    n_layers = model.config.num_hidden_layers
    stacks = [(name, module) for name, module in model.named_modules()
              if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers and name]
    if not stacks:
        raise UserError(f"{model.config.model_type}: no list of {n_layers} decoder layers in this model — "
                        "the cut needs a decoder-only model whose layers are one ModuleList")
    return min(stacks, key=lambda item: (item[0].count("."), item[0]))


def check_cuttable(shape: ModelShape, keep: int) -> None:
    """A cut is possible: not a mixture of experts, and fewer layers kept than the teacher has."""
    n_layers = shape.n_layers
    if shape.experts > 1:
        raise UserError(f"teacher architecture '{shape.model_type}' is a mixture of experts: it answers as a "
                        "teacher but is not cut — use student.init = 'checkpoint' (a small model of any family) "
                        "or 'config'")
    if not 1 <= keep < n_layers:
        raise UserError(f"student.keep_layers: must be between 1 and {n_layers - 1} for this "
                        f"{n_layers}-layer teacher (got {keep})")


def cut_config(config, kept: list[int]):
    """The teacher's config for a student of the kept layers: every per-layer list follows them."""
    n_layers = config.num_hidden_layers
    cut = copy.deepcopy(config)
    cut.num_hidden_layers = len(kept)
    for name, value in vars(config).items():
        if isinstance(value, list) and len(value) == n_layers and name != "architectures":
            setattr(cut, name, [value[i] for i in kept])
    if getattr(cut, "max_window_layers", None) is not None:
        cut.max_window_layers = min(cut.max_window_layers, len(kept))
    return cut
