"""The hf teacher's generation: left padding must not change what a prompt gets."""

import numpy as np

from conftest import build_tiny_model, build_tiny_tokenizer
from edgedistill.teachers.hf import generate_batch, prepare_tokenizer


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
