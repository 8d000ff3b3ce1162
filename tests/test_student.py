import pytest
import torch
from conftest import build_tiny_model, build_tiny_tokenizer

from edgedistill.distill.student import (
    angular_block,
    block_influence,
    cut_student,
    even_layers,
)
from edgedistill.errors import UserError
from edgedistill.models.hf import count_parameters


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_cut_keeps_exactly_the_chosen_layers_bit_for_bit(tokenizer, model_type):
    teacher = build_tiny_model(tokenizer, model_type, layers=6)
    kept = [0, 2, 5]
    student = cut_student(teacher, kept)
    t, s = teacher.state_dict(), student.state_dict()
    assert student.config.num_hidden_layers == 3
    for new, old in enumerate(kept):
        for key in [k for k in t if k.startswith(f"model.layers.{old}.")]:
            assert torch.equal(t[key], s[key.replace(f"layers.{old}.", f"layers.{new}.", 1)]), key
    for key in ("model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(t[key], s[key])
    assert not any(k.startswith("model.layers.3.") for k in s)
    assert count_parameters(student) < count_parameters(teacher)
    ids = torch.tensor([[1, 5, 9, 12]])
    assert torch.isfinite(student(ids).logits).all()


def test_cut_refuses_experts_and_models_without_a_layer_list(tokenizer):
    teacher = build_tiny_model(tokenizer, "llama", layers=2)
    teacher.config.num_local_experts = 4
    with pytest.raises(UserError, match="mixture of experts"):
        cut_student(teacher, [0])
    teacher.config.num_local_experts = 0
    teacher.config.num_hidden_layers = 5  # no ModuleList of 5 blocks anywhere in the model
    with pytest.raises(UserError, match="no list of 5 decoder layers"):
        cut_student(teacher, [0])


def test_even_layers_keeps_first_and_last():
    assert even_layers(30, 24)[0] == 0 and even_layers(30, 24)[-1] == 29
    assert len(even_layers(30, 24)) == 24 and len(even_layers(30, 6)) == 6
    assert even_layers(4, 2) == [0, 3]


def test_angular_block_drops_the_block_that_changes_nothing():
    torch.manual_seed(0)
    base = [torch.randn(20, 8) for _ in range(7)]  # 6 layers -> 7 boundaries
    base[4] = base[2] + 1e-4 * torch.randn(20, 8)  # layers 2 and 3 leave the state unchanged
    kept, scores = angular_block(base, 2)
    assert kept == [0, 1, 4, 5]
    assert min(scores) == scores[2]


def test_block_influence_drops_low_influence_layers_but_never_the_last():
    torch.manual_seed(0)
    states = [torch.randn(20, 8) for _ in range(6)]  # 5 layers
    states[2] = states[1].clone()  # layer 1: no change
    states[5] = states[4].clone()  # last layer: no change, but always kept
    kept, _ = block_influence(states, 1)
    assert kept == [0, 2, 3, 4]


def test_a_saved_model_keeps_its_kv_cache_on(tokenizer, tmp_path):
    # Training turns the cache off; a student saved that way was refused by the .pte export
    # ("The model must have caching enabled") and decodes without a cache in transformers.
    import json

    from edgedistill.models.hf import load_causal_lm, save_model

    model = build_tiny_model(tokenizer, "llama", layers=2)
    model.config.use_cache = False
    save_model(model, tokenizer, tmp_path / "student")
    assert json.loads((tmp_path / "student" / "config.json").read_text())["use_cache"] is True
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    (tmp_path / "student" / "config.json").write_text(json.dumps(config | {"use_cache": False}))  # saved before the fix
    loaded, _, _ = load_causal_lm(str(tmp_path / "student"))
    assert loaded.config.use_cache is True
