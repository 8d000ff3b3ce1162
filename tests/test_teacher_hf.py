"""The hf teacher's generation: left padding must not change what a prompt gets."""

import numpy as np
from conftest import build_tiny_model, build_tiny_tokenizer

from edgedistill.models.hf import generate_batch, prepare_tokenizer


def test_batched_left_padded_generation_matches_batch_one():
    tokenizer = build_tiny_tokenizer()
    prepare_tokenizer(tokenizer)
    model = build_tiny_model(tokenizer).eval()
    prompts = [[{"role": "user", "content": text}] for text in
               ("Hi", "Summarise this memo about the quarterly budget review meeting.", "次の文を要約してください。")]
    batched = generate_batch(model, tokenizer, prompts, max_new_tokens=6, temperature=0.0, top_k_logprobs=5)
    for prompt, together in zip(prompts, batched):
        (alone,) = generate_batch(model, tokenizer, [prompt], max_new_tokens=6, temperature=0.0, top_k_logprobs=5)
        assert together.prompt_ids == alone.prompt_ids
        assert together.token_ids == alone.token_ids
        assert np.array_equal(together.topk_ids, alone.topk_ids)
        assert np.allclose(together.topk_logprobs.astype(np.float32), alone.topk_logprobs.astype(np.float32), atol=2e-3)
        assert np.allclose(together.tail_logprobs, alone.tail_logprobs, atol=1e-3)


def test_score_gives_the_targets_generation_recorded():
    """On-policy KD scores answers the student wrote; on the teacher's own greedy answers the
    scores must be exactly the targets recorded while generating (one forward pass each)."""
    from edgedistill.models.hf import score_sequences

    tokenizer = build_tiny_tokenizer()
    prepare_tokenizer(tokenizer)
    model = build_tiny_model(tokenizer).eval()
    batch = [[{"role": "user", "content": text}] for text in ("Name three fruits.", "日本の首都は？", "Hi")]
    generated = generate_batch(model, tokenizer, batch, max_new_tokens=6, temperature=0.0, top_k_logprobs=5)
    scored = score_sequences(model, tokenizer, [(c.prompt_ids, c.token_ids) for c in generated], 5)
    for gen, sc in zip(generated, scored):
        assert sc.token_ids == gen.token_ids and sc.topk_ids.shape == (len(gen.token_ids), 5)
        assert (sc.topk_ids == gen.topk_ids).all()
        assert np.allclose(sc.topk_logprobs.astype(np.float32), gen.topk_logprobs.astype(np.float32), atol=2e-3)
        assert np.allclose(sc.tail_logprobs, gen.tail_logprobs, atol=2e-3)
    empty = score_sequences(model, tokenizer, [(generated[0].prompt_ids, [])], 5)[0]
    assert empty.topk_ids is None and empty.token_ids == []
