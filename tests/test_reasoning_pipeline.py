"""Reasoning teachers through whole stages: verified answers on the real GSM8K file (n samples
per prompt, rejection by reason, reselection without asking again), and the tiny pipeline with
train.reasoning = "full" and "budget:16", whose training examples differ as the modes say.

The teacher is a scripted OpenAI-compatible server on 127.0.0.1 answering in llama.cpp's layout
(tests/replayserver.py `scripted_body`): the thing under test is everything after the wire."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from conftest import SHARED_DATA, tiny_recipe_for
from replayserver import ReplayServer, scripted_body

from edgedistill.data.store import load_distill_set
from edgedistill.distill.reasoning import build_examples
from edgedistill.models.hf import load_tokenizer
from edgedistill.pipeline import run_recipe
from edgedistill.recipe import build_recipe
from edgedistill.run import open_ledger

GSM8K = SHARED_DATA / "gsm8k" / "train.jsonl"


@pytest.mark.skipif(not GSM8K.is_file(), reason="../shared/data not present")
def test_verified_gsm8k_answers_keep_the_shortest_correct_and_count_the_rest(tiny_teacher_dir, tmp_path):
    tok = load_tokenizer(str(tiny_teacher_dir))
    records = [json.loads(line) for line in GSM8K.read_text(encoding="utf-8").splitlines()[:5]]
    solution = {r["question"]: r["answer"] for r in records}
    asked = Counter()

    def answer(body: dict, _: int) -> tuple[str, bytes]:
        question = body["messages"][-1]["content"]
        work, gold = solution[question].split("####")
        variant = asked[question] % 4
        asked[question] += 1
        if variant == 0:  # a wrong final number
            return scripted_body(tok, work.strip(), f"The answer is {int(gold.replace(',', '')) + 1}.", logprobs=False)
        if variant == 1:  # right, with the whole solution as the trace
            return scripted_body(tok, work.strip(), f"The answer is {gold.strip()}.", logprobs=False)
        if variant == 2:  # right, with a short trace
            return scripted_body(tok, "Quick sum.", f"答え：{gold.strip()}", logprobs=False)
        return scripted_body(tok, work.strip()[:40], "", finish="length", logprobs=False)  # cut by max_tokens

    with ReplayServer(answer=answer) as server:
        recipe = build_recipe({
            "run": {"name": "verified", "runs_dir": str(tmp_path)},
            "teacher": {"backend": "openai", "model": "scripted", "base_url": server.base_url,
                        "tokenizer": str(tiny_teacher_dir), "concurrency": 4, "backoff_s": 0.01},
            "generate": {"seeds": [], "tasks": [{"path": str(GSM8K), "limit": 5}], "samples_per_prompt": 4,
                         "temperature": 0.7, "keep": "shortest", "heldout_fraction": 0.2},
            "student": {"keep_layers": 2}}, "<t>")
        run = run_recipe(recipe, only="generate")
        requests = len(server.requests)
        with open_ledger(run) as ledger:
            stage = ledger.metrics("generate", "stage")["stage"]
        kept = load_distill_set(run, split="train")
        # keep = "all": the stored answers are reselected, the teacher is not asked again.
        again = recipe.model_copy(update={"generate": recipe.generate.model_copy(update={"keep": "all"})})
        run_recipe(again, only="generate")
        assert len(server.requests) == requests
        with open_ledger(run) as ledger:
            all_kept = ledger.metrics("generate", "stage")["stage"]["verified_kept"]
    # 4 training questions x 4 answers + 1 held-out question x 1 answer (its reference for evaluation).
    assert requests == 4 * 4 + 1 and sum(asked.values()) == requests
    assert stage["verified_prompts"] == 4 and stage["verified_kept"] == 4 and stage["verified_rejected"] == 8
    assert stage["verified_rejected_wrong_answer"] == 4 and stage["verified_rejected_unfinished"] == 4
    assert stage["verified_dropped_longer"] == 4 and stage["verified_prompts_unsolved"] == 0
    assert all(s.reasoning == "Quick sum." and s.answer.startswith("答え") for s in kept) and len(kept) == 4
    assert stage["reasoning_tokens"] > 0 and stage["samples"] == 5 and all_kept == 8


def scripted_teacher(tok):
    """Every prompt answered with a trace of several sentences (over 16 tokens) and a short answer."""
    def answer(body: dict, _: int) -> tuple[str, bytes]:
        words = len(body["messages"][-1]["content"].split())
        trace = (f"The task has {words} words. I read it once. Then I check each part again. "
                 "Finally I write a short reply.")
        return scripted_body(tok, trace, "Here is a short reply.", k=2)
    return answer


def test_full_and_budget_reasoning_students_learn_from_different_examples(tiny_teacher_dir, tmp_path):
    tok = load_tokenizer(str(tiny_teacher_dir))
    with ReplayServer(answer=scripted_teacher(tok)) as server:
        base = tiny_recipe_for(tiny_teacher_dir, tmp_path / "runs")
        data = json.loads(base.model_dump_json(exclude_none=True))
        data["teacher"] |= {"backend": "openai", "model": "scripted", "base_url": server.base_url,
                            "tokenizer": str(tiny_teacher_dir), "concurrency": 2, "backoff_s": 0.01}
        data["evaluate"] |= {"judge": False, "reasoning_max_new_tokens": 12}
        full = build_recipe(data, "<full>", ["train.reasoning='full'"])
        run = run_recipe(full)
        budget = build_recipe(data, "<budget>", ["train.reasoning='budget:16'"])
        run_recipe(budget, only="train")
    with open_ledger(run) as ledger:
        generate = ledger.metrics("generate", "stage")["stage"]
        train = ledger.metrics("train", "stage")["stage"]
        evaluate = ledger.metrics("evaluate")
        export = ledger.metrics("export")
        meta = ledger.meta()
    assert generate["reasoning_samples"] == 8 and generate["text_only_traces"] == 0
    assert train["reasoning_samples"] == 6 and train["reasoning_cut_samples"] == 6  # the budget run's
    assert "budget:16" in meta["reasoning"] and "sentence end" in meta["reasoning"]
    # Thinking on and off per model, in the ledger and the report's Reasoning section.
    for model in ("teacher", "student_before", "student_after", "student_sft"):
        assert {"reasoning_arith_en_accuracy_on", "reasoning_arith_en_accuracy_off",
                "reasoning_arith_en_thinking_tokens"} <= set(evaluate[model]), model
    # And per GGUF file, in llama.cpp (issue 16), under its own row of the same table.
    for subject in ("gguf:f16", "gguf:q8_0"):
        assert {"reasoning_arith_en_accuracy_on", "reasoning_arith_en_accuracy_off", "reasoning_arith_en_thinking_tokens",
                "reasoning_mc_ja_accuracy_per_1k_off"} <= set(export[subject]), subject
    report = run.report_path.read_text(encoding="utf-8")
    assert "## Reasoning" in report and "| GGUF q8_0 (llama.cpp) | arith_en |" in report
    assert ".Thinking" in (run.export_dir / "Modelfile").read_text(encoding="utf-8")
    # The examples the two modes build from the same stored samples.
    samples = load_distill_set(run, split="train")
    student = load_tokenizer(str(run.student_init_dir))
    full_examples, _ = build_examples(samples, full.train, student, same_vocab=True)
    cut_examples, _ = build_examples(samples, budget.train, student, same_vocab=True)
    opening = len(student("<think>\n", add_special_tokens=False)["input_ids"])
    for sample, whole, cut in zip(samples, full_examples, cut_examples):
        trace = sample.reasoning_ids.tolist()
        answer = sample.answer_ids.tolist()
        target = whole.input_ids[whole.n_prompt:].tolist()
        assert target[opening:opening + len(trace)] == trace and target[-len(answer):] == answer
        kept = cut.input_ids[cut.n_prompt + opening:].tolist()
        kept = kept[:next(i for i in range(len(kept)) if kept[i:] and student.decode(kept[i:]).startswith("\n</think>"))]
        assert 0 < len(kept) <= 16 and kept == trace[:len(kept)] and student.decode(kept).endswith(".")
        assert len(cut.input_ids) < len(whole.input_ids)
        # The answer keeps the teacher's rows after the whole trace, not after the cut one.
        assert np.array_equal(whole.topk_ids[-len(answer):], sample.topk_ids)
        assert (cut.topk_logprobs[-len(answer):, 0] == 0).all() and not (whole.topk_logprobs[-len(answer):, 0] == 0).all()
