"""Reasoning models run here: a tiny Llama crafted to answer `<think>Two plus three</think> 5`
through the hf teacher and the transformers server, and llama.cpp's real server with its own
reasoning parser on a tiny model forced into `<think>` form by a grammar (the llamacpp teacher,
its thinking budget, and `edgedistill serve`)."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from conftest import ServeProcess, build_chain_model, build_tiny_think_tokenizer

from edgedistill.data.store import load_distill_set
from edgedistill.models.hf import encode_prompts, load_tokenizer
from edgedistill.pipeline import run_recipe
from edgedistill.recipe import GenerateCfg, TeacherCfg, build_recipe
from edgedistill.run import open_ledger

QUESTION = [{"role": "user", "content": "What is 2+3?"}]
# llama.cpp GBNF: the output is a <think> block then an answer (a random model never closes one).
THINK_GRAMMAR = 'root ::= "<think>" [a-z ]{4,12} "</think>" [a-z ]{2,8}'


@pytest.fixture(scope="module")
def chain_dir(tmp_path_factory):
    """The crafted thinker (Qwen3-style template): trace 'Two plus three', answer '5'."""
    tok = build_tiny_think_tokenizer("qwen3")
    start = encode_prompts(tok, [QUESTION])[0][-1]  # every ChatML generation prompt ends with this '\n'
    trace = tok("Two plus three", add_special_tokens=False)["input_ids"]
    answer = tok("5", add_special_tokens=False)["input_ids"]
    chain = [tok.convert_tokens_to_ids("<think>"), *trace, tok.convert_tokens_to_ids("</think>"), *answer,
             tok.eos_token_id]
    folder = tmp_path_factory.mktemp("chain")
    build_chain_model(tok, chain, start).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder, trace, answer


def test_the_hf_teacher_splits_its_trace_with_both_targets(chain_dir, tmp_path):
    folder, trace, answer = chain_dir
    recipe = build_recipe({"run": {"name": "hf", "runs_dir": str(tmp_path)}, "teacher": {"model": str(folder)},
                           "generate": {"limit_per_source": 2, "max_new_tokens": 24, "top_k_logprobs": 4},
                           "student": {"init": "config", "config": {"num_hidden_layers": 1}}}, "<t>")
    run = run_recipe(recipe, only="generate")
    samples = load_distill_set(run)
    tok = load_tokenizer(str(folder))
    assert len(samples) == 4
    for s in samples:  # greedy: each stored top-1 is the token chosen, trace and answer alike
        assert s.reasoning == "Two plus three" and s.answer == "5" and s.finished
        assert s.reasoning_ids.tolist() == trace and s.answer_ids.tolist() == answer + [tok.eos_token_id]
        assert (s.reasoning_topk_ids[:, 0] == trace).all() and (s.topk_ids[:, 0] == s.answer_ids).all()
        assert s.reasoning_topk_ids.shape == (len(trace), 4)
        mass = np.exp(s.reasoning_topk_logprobs.astype(np.float64)).sum(1) + np.exp(s.reasoning_tail_logprobs)
        assert np.allclose(mass, 1.0, atol=2e-3)
    with open_ledger(run) as ledger:
        stage = ledger.metrics("generate", "stage")["stage"]
        spent = ledger.usage()[("generate", folder.name)]
    # Generated: <think>, trace, </think>, answer, end of turn.
    assert stage["reasoning_tokens"] == 4 * len(trace) and spent["reasoning_tokens"] == 4 * len(trace)
    assert spent["completion_tokens"] == 4 * (len(trace) + len(answer) + 3)
    line = json.loads(run.dataset_jsonl_path.read_text(encoding="utf-8").splitlines()[0])
    assert line["reasoning"] == "Two plus three" and line["reasoning_tokens"] == len(trace)
    from datasets import load_from_disk

    row = load_from_disk(str(run.dataset_dir))["train"][0]
    assert row["reasoning_ids"] == trace and len(row["reasoning_topk_ids"]) == len(trace)


def test_thinking_off_is_all_answer_even_when_the_template_opens_the_trace(reasoning_dirs):
    from edgedistill.models.hf import generate_batch, load_causal_lm
    from edgedistill.models.reasoning import template_style

    model, tok, _ = load_causal_lm(str(reasoning_dirs["r1"]))
    assert template_style(tok).opened
    [on] = generate_batch(model, tok, [QUESTION], max_new_tokens=6, temperature=0.0, top_k_logprobs=None)
    [off] = generate_batch(model, tok, [QUESTION], max_new_tokens=6, temperature=0.0, top_k_logprobs=None,
                           thinking=False)
    # A random model never closes the trace it was opened in: with thinking on all of it is trace;
    # off, the prompt ends with the empty block and what follows is the answer.
    assert on.text == "" and len(on.reasoning_ids) > 0 and not on.finished
    assert off.reasoning is None and off.reasoning_ids == [] and off.text and off.generated_tokens == 6
    assert tok.decode(off.prompt_ids).endswith("<think>\n\n</think>\n\n")


def test_the_transformers_server_returns_the_trace_in_reasoning_content(chain_dir):
    folder, _, _ = chain_dir
    server = ServeProcess(str(folder), "--engine", "transformers")
    try:
        body = {"model": folder.name, "messages": QUESTION, "max_tokens": 24, "temperature": 0}
        message = httpx.post(server.base + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]
        assert message == {"role": "assistant", "content": "5", "reasoning_content": "Two plus three"}
        trace, answer, chunks = "", "", 0
        with httpx.stream("POST", server.base + "/v1/chat/completions", json=body | {"stream": True}, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"] if json.loads(line[6:])["choices"] else {}
                    trace += delta.get("reasoning_content", "")
                    answer += delta.get("content", "")
                    chunks += 1
        assert (trace, answer) == ("Two plus three", "5") and chunks > 3
    finally:
        server.stop()


@pytest.fixture(scope="module")
def think_gguf(reasoning_dirs, tmp_path_factory):
    """The tiny random Qwen3-style and R1-style models as F16 GGUF (tokenizer and template inside)."""
    from edgedistill.export.gguf import export_gguf

    out = tmp_path_factory.mktemp("gguf")
    return {style: export_gguf(reasoning_dirs[style], out / f"tiny-{style}.gguf", "f16", name=f"tiny-{style}").path
            for style in ("qwen3", "r1")}


def test_llamacpp_teacher_stores_what_the_servers_own_reasoning_parser_split(think_gguf, reasoning_dirs, tmp_path):
    recipe = build_recipe({
        "run": {"name": "llamacpp", "runs_dir": str(tmp_path)},
        "teacher": {"backend": "llamacpp", "model": str(think_gguf["qwen3"]), "tokenizer": str(reasoning_dirs["qwen3"]),
                    "concurrency": 2, "extra_body": {"grammar": THINK_GRAMMAR}},
        "generate": {"limit_per_source": 2, "max_new_tokens": 24, "top_k_logprobs": 2},
        "student": {"keep_layers": 2}}, "<t>")
    run = run_recipe(recipe, only="generate")
    samples = load_distill_set(run)
    tok = load_tokenizer(str(reasoning_dirs["qwen3"]))
    assert len(samples) == 4
    for s in samples:
        # The grammar's trace letters came back in reasoning_content, apart from the answer.
        assert s.reasoning and set(s.reasoning) <= set("abcdefghijklmnopqrstuvwxyz ") and "<think>" not in s.answer
        assert tok.decode(s.reasoning_ids.tolist()).strip() == s.reasoning and 401 not in s.reasoning_ids
        assert s.reasoning_topk_ids.shape == (len(s.reasoning_ids), 2) and s.topk_ids.shape == (len(s.answer_ids), 2)
        assert s.finished and tok.decode(s.answer_ids.tolist(), skip_special_tokens=True).strip() == s.answer
    with open_ledger(run) as ledger:
        stage = ledger.metrics("generate", "stage")["stage"]
    assert stage["reasoning_tokens"] == sum(len(s.reasoning_ids) for s in samples) > 0
    assert stage["text_only_answers"] == 0 and stage["text_only_traces"] == 0


def test_llamacpp_thinking_budget_forces_the_end_and_its_rows_are_not_the_teachers(think_gguf, reasoning_dirs):
    from edgedistill.teachers import build_teacher

    cfg = TeacherCfg(backend="llamacpp", model=str(think_gguf["r1"]), tokenizer=str(reasoning_dirs["r1"]),
                     concurrency=1, reasoning_budget=2, reasoning_budget_message="Enough.")
    teacher = build_teacher(cfg, GenerateCfg(max_new_tokens=14, top_k_logprobs=2))
    try:
        [c] = teacher.chat([QUESTION])
    finally:
        teacher.close()
    # Two tokens of its own, then the message and </think> forced by the server (measured form).
    assert c.reasoning.endswith("Enough.") and teacher.usage.forced_rows >= 3
    forced = c.reasoning_topk_logprobs[-3:].astype(np.float64)
    assert (forced[:, 0] == 0).all() and np.isneginf(forced[:, 1:]).all()  # all the mass on the forced token
    assert (c.reasoning_topk_ids[-3:, 0] == c.reasoning_ids[-3:]).all()


def test_edgedistill_serve_passes_llamacpps_reasoning_content_through(think_gguf):
    server = ServeProcess(str(think_gguf["qwen3"]))
    try:
        body = {"messages": QUESTION, "max_tokens": 24, "temperature": 0, "grammar": THINK_GRAMMAR}
        message = httpx.post(server.base + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]
        assert message["reasoning_content"] and set(message["reasoning_content"]) <= set("abcdefghijklmnopqrstuvwxyz ")
        assert "think>" not in message["content"]
    finally:
        server.stop()


def test_each_gguf_file_is_scored_with_thinking_on_and_off_as_transformers_scores_it(tmp_path):
    """Issue 16: the export stage scores every eval set in llama.cpp with thinking on and off, by
    the transformers rows' rules, and the report's Reasoning table carries the GGUF row."""
    from edgedistill.evaluate.reasoning import METRICS, hf_generator, reasoning_metrics
    from edgedistill.evaluate.report import _reasoning_markdown, reasoning_table
    from edgedistill.evaluate.tasks import TaskItem
    from edgedistill.export.gguf_reasoning import ThinkingSets
    from edgedistill.export.stage import Checks, _numbers, write_and_check
    from edgedistill.models.hf import load_causal_lm
    from edgedistill.models.reasoning import model_style
    from edgedistill.run import Ledger

    # The crafted thinker answers `<think>Two plus three</think>yes` after any prompt. Thinking off,
    # the prompt ends in an empty block and it thinks anyway: the whole text is then its answer.
    tok = build_tiny_think_tokenizer("qwen3")
    trace = tok("Two plus three", add_special_tokens=False)["input_ids"]
    answer = tok("yes", add_special_tokens=False)["input_ids"]
    chain = [tok.convert_tokens_to_ids("<think>"), *trace, tok.convert_tokens_to_ids("</think>"), *answer,
             tok.eos_token_id]
    folder = tmp_path / "thinker"
    build_chain_model(tok, chain, encode_prompts(tok, [QUESTION])[0][-1]).save_pretrained(folder)
    tok.save_pretrained(folder)
    model, tokenizer, _ = load_causal_lm(str(folder))
    style = model_style(folder, tokenizer)
    items = [TaskItem([{"role": "user", "content": "Is 2+3 five? Say yes or no."}], "en", answer="yes"),
             TaskItem([{"role": "user", "content": "Is 2+3 six? Say yes or no."}], "en", answer="no")]
    checks = Checks(conversations=[], sequences=[], quality=[], parity_tokens=0, eval_positions=0,
                    speed_prompt_tokens=16, speed_tokens=8, answer_tokens=8,
                    thinking=ThinkingSets({"yn": (items, 8)}, 24, style))
    [row], _ = write_and_check(folder, tmp_path, "thinker", ["f16"], {}, "q8_0", checks, model, tokenizer)

    gguf = {key: row[f"reasoning_yn_{key}"] for key in METRICS}
    generated = len(chain)  # on: the whole chain, end of turn included; off: cut at 8 tokens
    assert gguf == {"accuracy_on": 0.5, "accuracy_off": 0.0, "thinking_tokens": len(trace),
                    "accuracy_per_1k_on": 1000 / (2 * generated), "accuracy_per_1k_off": 0.0}
    assert gguf == reasoning_metrics(hf_generator(model, tokenizer, 2, style), items, max_new_tokens_on=24,
                                     max_new_tokens_off=8)

    ledger = Ledger(tmp_path / "run.db")
    for stage in ("evaluate", "export"):
        ledger.start_stage(stage, "f")
        ledger.end_stage(stage, "done")
    ledger.log_metrics("export", "gguf:f16", _numbers(row))
    header, rows = reasoning_table(ledger)
    assert rows == [["GGUF f16 (llama.cpp)", "yn", "50.0%", "0.0%", f"{len(trace):.1f}",
                     f"{1000 / (2 * generated):.2f}", "0.00"]]
    assert "| GGUF f16 (llama.cpp) | yn | 50.0% |" in _reasoning_markdown(ledger)
    ledger.close()


def test_parity_counts_a_finished_answer_as_identical(chain_dir, tmp_path):
    """Greedy parity on an answer that ends before the token limit: transformers keeps its
    end-of-turn token and this llama.cpp build returns it too — the same answer either way,
    not a split at a 0.0000 gap (what the check reported before)."""
    from edgedistill.export.stage import Checks, write_and_check
    from edgedistill.models.hf import load_causal_lm

    folder = chain_dir[0]
    model, tokenizer, _ = load_causal_lm(str(folder))
    checks = Checks(conversations=[QUESTION], sequences=[], quality=[], parity_tokens=24, eval_positions=0,
                    speed_prompt_tokens=16, speed_tokens=8, answer_tokens=8)
    [row], parity = write_and_check(folder, tmp_path, "chain", ["f16"], {}, "q8_0", checks, model, tokenizer)
    assert parity["greedy_match"] == 1 and parity["greedy_near_ties"] == 0, parity
