"""Every model family at both ends: a tiny random model of each family is cut, trained two steps,
saved, loaded back by plain AutoModelForCausalLM, converted by llama.cpp's converter and run in
llama.cpp with the same tokens and log-probabilities as in transformers. MoE models answer as
teachers (top-k through the hf backend) and are refused as cut students in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny_tokenizer

from edgedistill.data.store import Sample
from edgedistill.errors import UserError
from edgedistill.export.gguf import export_gguf
from edgedistill.export.verify import LlamaCppClient, check_parity, serve

CONVERSATIONS = [[{"role": "user", "content": "Name three fruits."}],
                 [{"role": "user", "content": "日本の首都はどこですか？"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi 🙂"}]]

# Per-family settings a 2-layer-wide tiny model needs (the defaults are sized for real models:
# Qwen3 and Gemma 3 default head_dim 128/256, Phi-3 pads with id 32000). Gemma 3's layers are
# sliding or full attention; the cut keeps a layout llama.cpp must be told about.
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]},
    "phi3": {},
}
# Largest |log-prob difference| llama.cpp (F32, float32 attention) may show against transformers:
# measured ≤ 1.2e-5 for the Llama-like families and ~1.1e-3 for tiny Gemma 3 (its GELU and
# embedding scale round differently in ggml); the bounds leave a margin of ~8x and ~2x.
TOLERANCE = {"gemma3_text": 3e-3}


def tiny_teacher(model_type: str, tokenizer, layers: int = 4):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        initializer_range=0.2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **FAMILIES.get(model_type, {}))
    return AutoModelForCausalLM.from_config(config)


def probe_samples(tokenizer) -> list[Sample]:
    texts = ["The quarterly report shows sales rising in Osaka and Nagoya.", "会議は金曜日の午後三時に始まります。"]
    samples = []
    for i, text in enumerate(texts):
        ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int32)
        samples.append(Sample(f"s{i}", "train", "en", "test", "tiny", [{"role": "user", "content": text}],
                              ids[:4], ids[4:], True))
    return samples


def train_two_steps(model, tokenizer) -> list[float]:
    batch = tokenizer(["Ship it on Friday, 価格は据え置き。", "Three fruits: apple, pear, plum."], return_tensors="pt",
                      padding=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(2):
        loss = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_a_family_is_cut_trained_exported_and_runs_in_llamacpp_as_in_transformers(tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    from edgedistill.distill.student import choose_layers, cut_student
    from edgedistill.models.hf import load_causal_lm, prepare_tokenizer, save_model

    tokenizer = build_tiny_tokenizer()
    prepare_tokenizer(tokenizer)
    teacher = tiny_teacher(model_type, tokenizer)
    kept, _ = choose_layers(teacher, "angular", 3, probe_samples(tokenizer))
    student = cut_student(teacher, kept)
    assert student.config.num_hidden_layers == 3
    if model_type == "gemma3_text":  # the per-layer attention kinds follow the kept layers
        assert student.config.layer_types == [FAMILIES[model_type]["layer_types"][i] for i in kept]
    losses = train_two_steps(student, tokenizer)
    assert losses[1] < losses[0]
    folder = tmp_path / f"{model_type}-student"
    save_model(student, tokenizer, folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder)  # plain transformers, no edgedistill code
    assert type(reloaded).__name__ == type(teacher).__name__
    ids = torch.tensor([tokenizer("a quick check")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, student(ids).logits, atol=1e-5)

    result = export_gguf(folder, tmp_path / "out" / f"{model_type}-f32.gguf", "f32", name="tiny-student")
    assert result.architecture == type(teacher).__name__
    model, tok, _ = load_causal_lm(str(folder))
    with serve(result.path, threads=1, ctx=1024, exact=True) as server:
        client = LlamaCppClient(server)
        try:
            parity = check_parity(client, model, tok, CONVERSATIONS, 12)
        finally:
            client.close()
    assert parity.tokenizer_match and parity.template_match, parity.first_difference
    assert parity.greedy_match + parity.near_tie_splits == len(CONVERSATIONS), parity.first_difference
    assert parity.compared_positions >= 40 and parity.max_logprob_diff < TOLERANCE.get(model_type, 1e-4), parity


def moe_folder(tmp_path: Path, model_type: str) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgedistill.models.hf import prepare_tokenizer

    tokenizer = build_tiny_tokenizer()
    prepare_tokenizer(tokenizer)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                  tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
    extra = ({"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 8,
              "layer_types": ["sliding_attention", "full_attention"]} if model_type == "gpt_oss"
             else {"intermediate_size": 128, "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2,
                   "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **(common | extra)))
    folder = tmp_path / model_type
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("model_type", ["gpt_oss", "qwen3_moe"])
def test_a_mixture_of_experts_teacher_answers_with_top_k_and_is_not_cut(tmp_path, model_type):
    from edgedistill.models.families import check_cuttable
    from edgedistill.models.hf import model_shape, resolve_source
    from edgedistill.recipe import GenerateCfg, TeacherCfg
    from edgedistill.teachers import build_teacher

    folder = moe_folder(tmp_path, model_type)
    teacher = build_teacher(TeacherCfg(model=str(folder)), GenerateCfg(max_new_tokens=6, top_k_logprobs=5))
    (answer,) = teacher.chat([[{"role": "user", "content": "Name three fruits."}]])
    assert answer.topk_ids.shape == (len(answer.token_ids), 5) and len(answer.token_ids) >= 1
    # The stored top-1 is the token greedy decoding chose, and the k + tail buckets hold all the mass.
    assert (answer.topk_ids[:, 0] == np.asarray(answer.token_ids)).all()
    mass = np.exp(answer.topk_logprobs.astype(np.float64)).sum(-1) + np.exp(answer.tail_logprobs.astype(np.float64))
    assert np.allclose(mass, 1.0, atol=5e-3)
    shape = model_shape(resolve_source(str(folder)))
    assert shape.experts == 4
    with pytest.raises(UserError, match=f"teacher architecture '{model_type}' is a mixture of experts: it answers"):
        check_cuttable(shape, 1)


def test_a_base_gemma_tokenizer_gets_gemmas_turn_format():
    from edgedistill.models.families import GEMMA_TEMPLATE
    from edgedistill.models.hf import prepare_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = None
    prepare_tokenizer(tokenizer)
    assert tokenizer.chat_template == GEMMA_TEMPLATE
    text = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": " Hi "},
                                          {"role": "assistant", "content": "Hello"}],
                                         tokenize=False, add_generation_prompt=True)
    assert text == (f"{tokenizer.bos_token}<start_of_turn>user\nBe brief.<end_of_turn>\n<start_of_turn>user\nHi"
                    "<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n<start_of_turn>model\n")
