"""The transformers engine of the private server: the decode loop against transformers' own
generate, and the real CLI serving a HF folder and a run without exports to the official client."""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai
import pytest
import torch
from conftest import (
    ServeProcess,
    build_tiny_spm_tokenizer,
    build_tiny_tokenizer,
    subprocess_env,
)

from edgedistill.serve.hf_engine import (
    TEXT_ONLY,
    DecodeRequest,
    Detokenizer,
    Finish,
    decode,
    held_back,
)

QUESTION = [{"role": "user", "content": "Write a short poem about the sea."}]


@pytest.fixture(scope="module")
def tiny(tiny_teacher_dir):
    from edgedistill.models.hf import encode_prompts, end_of_turn_ids, load_causal_lm

    model, tokenizer, _ = load_causal_lm(str(tiny_teacher_dir))
    return model, tokenizer, end_of_turn_ids(model, tokenizer), encode_prompts(tokenizer, [QUESTION])[0]


@pytest.mark.parametrize("build", [build_tiny_tokenizer, build_tiny_spm_tokenizer])
def test_incremental_text_equals_decoding_the_whole_answer(build):
    tokenizer = build()
    ids = tokenizer("海の詩を書いてください。 Write a poem, then 東京タワー!", add_special_tokens=False)["input_ids"]
    ids = ids[:5] + [tokenizer.eos_token_id] + ids[5:]  # a special token inside is skipped, as decode does
    vocab = tokenizer.get_vocab()
    if "<0xE4>" in vocab:  # SentencePiece byte fallback: two characters spelled byte by byte
        ids += [vocab[f"<0x{b:02X}>"] for b in "京都".encode()]
    text = Detokenizer(tokenizer)
    for n, token in enumerate(ids, start=1):
        text.add(token)
        assert "\ufffd" not in text.settled
        whole = tokenizer.decode(ids[:n], skip_special_tokens=True)
        # While a character's bytes are incomplete, a byte-fallback decoder turns the whole run of
        # byte pieces into U+FFFD, rewriting text it gave before: compare at whole characters only.
        if "\ufffd" not in whole:
            assert whole.startswith(text.settled) and text.final() == whole
    assert text.settled == tokenizer.decode(ids, skip_special_tokens=True)


def run(model, tokenizer, end_ids, request):
    items = list(decode(model, tokenizer, request, end_ids))
    assert isinstance(items[-1], Finish)
    return items[:-1], items[-1]


def test_greedy_decode_matches_transformers_generate_and_reports_true_logprobs(tiny):
    model, tokenizer, end_ids, prompt = tiny
    steps, finish = run(model, tokenizer, end_ids, DecodeRequest(prompt, max_tokens=12, temperature=0, top_logprobs=5))
    tokens = [s.token_id for s in steps if s.token_id != TEXT_ONLY]
    reference = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
    assert tokens == [t for t in reference if t not in end_ids][:len(tokens)] and len(tokens) == finish.completion_tokens
    assert "".join(s.delta for s in steps) == tokenizer.decode(tokens, skip_special_tokens=True)
    with torch.no_grad():  # teacher-forced log-probs of the same tokens, one forward pass
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    expected = torch.log_softmax(logits.float(), -1)
    for position, step in enumerate(s for s in steps if s.token_id != TEXT_ONLY):
        assert step.logprob == pytest.approx(float(expected[position, step.token_id]), abs=1e-4)
        assert step.top[0][0] == step.token_id and len(step.top) == 5  # greedy: the chosen token is the top one
        assert [lp for _, lp in step.top] == sorted((lp for _, lp in step.top), reverse=True)


def test_stop_strings_end_the_answer_and_are_never_released(tiny):
    model, tokenizer, end_ids, prompt = tiny
    steps, _ = run(model, tokenizer, end_ids, DecodeRequest(prompt, max_tokens=16, temperature=0))
    whole = "".join(s.delta for s in steps)
    stop = whole[len(whole) // 2:len(whole) // 2 + 3]
    assert len(stop) == 3
    steps, finish = run(model, tokenizer, end_ids, DecodeRequest(prompt, max_tokens=16, temperature=0, stop=[stop]))
    assert "".join(s.delta for s in steps) == whole[:whole.find(stop)] and finish.reason == "stop"
    assert held_back("the end is EN", ["END"]) == 2 and held_back("abc", ["xyz"]) == 0 and held_back("", ["a"]) == 0


def test_seeded_sampling_is_reproducible(tiny):
    model, tokenizer, end_ids, prompt = tiny
    ask = lambda seed: [s.token_id for s in run(model, tokenizer, end_ids, DecodeRequest(
        prompt, max_tokens=10, temperature=1.0, top_p=0.9, seed=seed))[0]]
    assert ask(7) == ask(7)
    assert ask(7) != ask(8) or ask(7) != ask(9)


@pytest.fixture(scope="module")
def hf_server(tiny_teacher_dir):
    server = ServeProcess(str(tiny_teacher_dir), "--max-tokens", "64")
    yield server
    server.stop()


def test_a_hf_folder_is_served_by_transformers_to_the_openai_client(hf_server, tiny_teacher_dir):
    client, model = hf_server.client(), tiny_teacher_dir.name
    assert [m.id for m in client.models.list().data] == [model]
    answer = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=10, temperature=0,
                                            logprobs=True, top_logprobs=4)
    choice = answer.choices[0]
    assert choice.message.content and choice.finish_reason in ("length", "stop")
    entries = choice.logprobs.content
    assert len(entries) == answer.usage.completion_tokens and all(len(e.top_logprobs) == 4 for e in entries)
    assert entries[0].top_logprobs[0].logprob == pytest.approx(entries[0].logprob)  # greedy picks the top token
    chunks = list(client.chat.completions.create(model=model, messages=QUESTION, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    plain = client.completions.create(model=model, prompt="The sea is", max_tokens=6, temperature=0, logprobs=2)
    assert plain.choices[0].text and len(plain.choices[0].logprobs.token_logprobs) == plain.usage.completion_tokens
    with pytest.raises(openai.BadRequestError, match="above this server's limit"):
        client.chat.completions.create(model=model, messages=QUESTION, max_tokens=65)
    too_long = httpx.post(hf_server.base + "/v1/completions", json={"prompt": "sea " * 600, "max_tokens": 2})
    assert too_long.status_code == 400 and "context" in too_long.json()["error"]["message"]


def test_the_transformers_engine_is_a_teacher_with_the_hf_backends_targets(hf_server, tiny_teacher_dir, tmp_path):
    """Round trip: the same model through the server and through the hf backend gives the same
    answer tokens and the same top-k targets (greedy)."""
    from edgedistill.data.store import load_distill_set
    from edgedistill.pipeline import run_recipe
    from edgedistill.recipe import build_recipe

    def distill_set(name: str, teacher: dict):
        recipe = build_recipe({"run": {"name": name, "runs_dir": str(tmp_path)}, "teacher": teacher,
                               "generate": {"limit_per_source": 1, "max_new_tokens": 8, "top_k_logprobs": 5,
                                            "temperature": 0.0}, "student": {"keep_layers": 2}}, "<round trip>")
        return {tuple(m["content"] for m in s.messages[:-1]): s for s in load_distill_set(run_recipe(recipe, only="generate"))}

    served = distill_set("via-server", {"backend": "openai", "model": tiny_teacher_dir.name, "concurrency": 1,
                                        "tokenizer": str(tiny_teacher_dir), "base_url": hf_server.base + "/v1"})
    local = distill_set("local", {"model": str(tiny_teacher_dir)})
    assert served.keys() == local.keys() and len(served) == 2
    for key, sample in served.items():
        assert sample.answer_ids.tolist() == local[key].answer_ids.tolist()
        assert (sample.topk_ids == local[key].topk_ids).all()
        assert abs(sample.topk_logprobs.astype(float) - local[key].topk_logprobs.astype(float)).max() < 0.01


def test_a_run_without_exports_serves_its_student_and_engines_can_be_forced(tmp_path, tiny_teacher_dir):
    from edgedistill.errors import UserError
    from edgedistill.serve.server import resolve_model

    run = tmp_path / "my-run"
    (run / "student").mkdir(parents=True)
    (run / "run.db").write_bytes(b"")
    (run / "student" / "config.json").write_text("{}")
    assert resolve_model(str(run)) == ("transformers", run / "student", "my-run")
    with pytest.raises(UserError, match="no GGUF yet"):
        resolve_model(str(run), "llamacpp")
    (run / "export").mkdir()
    (run / "export" / "my-run-q8_0.gguf").write_bytes(b"GGUF")
    assert resolve_model(str(run)).engine == "llamacpp"
    assert resolve_model(str(run), "transformers").path == run / "student"
    assert resolve_model(str(tiny_teacher_dir)).engine == "transformers"
    with pytest.raises(UserError, match="GGUF file"):
        resolve_model("embedded", "transformers")
    broken = subprocess.run([sys.executable, "-m", "edgedistill", "serve", str(tmp_path / "nothing-here")],
                            env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert broken.returncode == 2 and "Traceback" not in broken.stderr and "nothing-here" in broken.stderr
