"""Evaluation: eval-set formats on the real GSM8K and JCommonsenseQA files, the scoring rules,
the position-swapped judge, and the report (report.md, report.html in headless Chromium)
against the ledger of a real tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, tiny_recipe_for

from edgedistill.errors import UserError
from edgedistill.evaluate.judge import (
    bootstrap_interval,
    combine,
    judge_pairs,
    parse_verdict,
)
from edgedistill.evaluate.tasks import (
    choice_logliks,
    chosen_by_text,
    exact_match,
    load_task,
    score_task,
)
from edgedistill.models.hf import Completion
from edgedistill.teachers import Usage

needs_shared = pytest.mark.skipif(not (SHARED_DATA / "gsm8k").is_dir(), reason="../shared/data not present")


@needs_shared
def test_real_gsm8k_and_jcommonsenseqa_files_load_with_their_golds():
    gsm = load_task(str(SHARED_DATA / "gsm8k" / "train.jsonl"), limit=5)
    assert [i.answer for i in gsm[:2]] == ["72", "10"] and all(i.lang == "en" and i.choices is None for i in gsm)
    jcqa = load_task(str(SHARED_DATA / "jcommonsenseqa" / "valid-v1.3.jsonl"), limit=5)
    first = jcqa[0]
    assert first.lang == "ja" and first.label == 2 and first.choices[2] == "マザーボード"
    assert "マザーボード" in first.messages[-1]["content"] and "選択肢" in first.messages[-1]["content"]


def test_bundled_sets_and_bad_records_named_by_file_and_line(tmp_path):
    assert {len(load_task(f"bundled:{n}")) for n in ("arith_en", "arith_ja", "mc_en", "mc_ja")} <= {16, 24}
    bad = tmp_path / "mine.jsonl"
    good = {"messages": [{"role": "user", "content": "2+2?"}], "answer": "4"}
    bad.write_text(json.dumps(good) + "\n\n" + json.dumps({"messages": [{"role": "user", "content": "x"}],
                                                           "choices": ["a", "b"], "label": 5}) + "\n")
    with pytest.raises(UserError, match=r"mine.jsonl:3: 'label' must be the index"):
        load_task(str(bad))
    bad.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(UserError, match=r"mine.jsonl:2: "):
        load_task(str(bad))
    with pytest.raises(UserError, match="eval set not found"):
        load_task(str(tmp_path / "missing.jsonl"))


def test_answer_extraction_rules():
    assert exact_match("So the total is 1,234 apples.", "1234")
    assert exact_match("答えは７２個です。", "72")  # full-width digits
    assert exact_match("She earned $10.", "10") and not exact_match("10 then 12", "10")
    assert exact_match("Paris.\nIt is the capital.", "paris") and not exact_match("London", "Paris")
    assert chosen_by_text("答えはマザーボードです", ["掲示板", "パソコン", "マザーボード"]) == 2
    assert chosen_by_text("2", ["a", "b", "c"]) == 2 and chosen_by_text("no idea", ["a b", "c d"]) is None
    assert chosen_by_text("3", ["a", "b", "c"]) is None  # choices count from 0: 3 names none of three
    # numbers compare within 1e-9 relative or 1e-6 absolute (float rounding), not more
    assert exact_match("1000000000001", "1000000000000") and exact_match("0.0000001", "0")
    assert not exact_match("73", "72") and not exact_match("0.00001", "0")
    # an empty answer matches no text gold (not even one spelt like mutmut's placeholder)
    assert not exact_match("", "Paris") and not exact_match(" \n", "XXXX")


def test_numeric_golds_match_answers_written_the_japanese_and_typographic_way():
    # Each pair misread before (the last ASCII number after NFKC): 7万ドル read 7, 18㎡ read 2.
    pairs = [("7万ドル", "70000"), ("5万7500ドル", "57500"), ("1万2000円です", "12000"), ("答えは十八個です", "18"),
             ("18㎡", "18"), ("広さは18 m²", "18"), ("−5", "-5"), ("答えは18ドルです（1個あたり2ドル）", "18"),
             ("#### 18\n（2ステップで計算）", "18"), ("Answer: 18 (2 steps)", "18"), (r"$\boxed{18}$ in 2 steps", "18")]
    assert [(p, g) for p, g in pairs if not exact_match(p, g)] == []
    assert not exact_match("7万ドル", "7") and not exact_match("18㎡", "2") and not exact_match("−5", "5")
    assert exact_match("3.5kg", "3.5") and exact_match("$1,200", "1200") and exact_match("**答え：７２**", "72")
    assert exact_match("合計は1万2000円", "1万2000")  # a gold written with 万 is numeric too


def test_choice_loglik_equals_a_direct_forward_and_scores_are_accuracies(tiny_teacher_dir):
    from edgedistill.models.hf import encode_prompts, load_causal_lm

    model, tokenizer, _ = load_causal_lm(str(tiny_teacher_dir))
    item = load_task("bundled:mc_en", limit=1)[0]
    scores = choice_logliks(model, tokenizer, item)
    prompt = encode_prompts(tokenizer, [item.messages])[0]
    choice = tokenizer(item.choices[1], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([prompt + choice])).logits[0].float(), -1)
    direct = sum(float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(choice))
    assert scores[1] == pytest.approx(direct, abs=1e-3) and len(scores) == len(item.choices)

    # the same through both paths of continuation_logliks: the shared-prefix cache (prefix >= 2
    # tokens) and whole sequences minus the prefix (a one-token prefix takes that path)
    from edgedistill.models.hf import continuation_logliks

    for prefix in (prompt, prompt[:1]):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([prefix + choice])).logits[0].float(), -1)
        by_hand = sum(float(lp[len(prefix) - 1 + i, t]) for i, t in enumerate(choice))
        got = continuation_logliks(model, tokenizer.pad_token_id, prefix, [choice, choice[:1]])
        assert got[0] == pytest.approx(by_hand, abs=1e-3) and got[1] == pytest.approx(float(lp[len(prefix) - 1, choice[0]]),
                                                                                     abs=1e-3)
        # one-token continuations only: nothing runs after the prefix (the last column is never run)
        after_prefix = lp[len(prefix) - 1]
        ones = continuation_logliks(model, tokenizer.pad_token_id, prefix, [[choice[0]], [choice[-1]]])
        assert ones == pytest.approx([float(after_prefix[choice[0]]), float(after_prefix[choice[-1]])], abs=1e-3)

    # score_task against the same rules applied by hand: each item answered alone by
    # model.generate (greedy, no padding), each choice scored by a forward of its own.
    mc, arith = load_task("bundled:mc_ja", limit=4), load_task("bundled:arith_en", limit=4)
    end_ids = {tokenizer.eos_token_id, *([model.generation_config.eos_token_id] if model.generation_config.eos_token_id
                                         is not None else [])}

    def answer_alone(item) -> str:
        ids = torch.tensor([encode_prompts(tokenizer, [item.messages])[0]])
        with torch.no_grad():
            new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        new = new[:next((i + 1 for i, t in enumerate(new) if t in end_ids), len(new))]
        return tokenizer.decode(new, skip_special_tokens=True).strip()

    def loglik_alone(item, choice: str) -> float:
        prompt = encode_prompts(tokenizer, [item.messages])[0]
        tokens = tokenizer(choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([prompt + tokens])).logits[0].float(), -1)
        return sum(float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens))

    answers = [answer_alone(i) for i in mc + arith]
    # Golds chosen so that no accuracy is 0 or 1 by accident (the random model knows nothing):
    # two arithmetic golds are the model's own answers (text golds), the others stay numbers;
    # the last MC item gets its answer's text as choice 1 and that as its label (a generate
    # hit); the first two MC labels are the log-likelihood argmax, the third is not.
    assert answers[4] and answers[5] and answers[3]
    arith[0].answer, arith[1].answer = answers[4], answers[5]
    mc[3].choices[1], mc[3].label = answers[3], 1
    best = [max(range(len(i.choices)), key=lambda c, i=i: loglik_alone(i, i.choices[c])) for i in mc]
    mc[0].label, mc[1].label, mc[2].label = best[0], best[1], (best[2] + 1) % len(mc[2].choices)
    expected = {"items": 8,
                "exact_match": sum(exact_match(a, i.answer) for a, i in zip(answers[4:], arith)) / 4,
                "mc_loglik_acc": sum(b == i.label for b, i in zip(best, mc)) / 4,
                "mc_generate_acc": sum(chosen_by_text(a, i.choices) == i.label for a, i in zip(answers, mc)) / 4}
    assert 0 < expected["exact_match"] < 1 and 0 < expected["mc_loglik_acc"] < 1 and expected["mc_generate_acc"] > 0
    # batch_size 3: batches mix MC and arithmetic items, and the last one is short
    assert score_task(model, tokenizer, mc + arith, max_new_tokens=4, batch_size=3) == expected


def _sample(prompt_ids, answer_ids, answer: str = "", lang: str = "en", topk_ids=None):
    import numpy as np

    from edgedistill.data.store import Sample

    k = None if topk_ids is None else topk_ids.shape[1]
    return Sample(id=answer or str(len(prompt_ids)), split="heldout", lang=lang, source="s", teacher="t",
                  messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}],
                  prompt_ids=np.asarray(prompt_ids, dtype=np.int32), answer_ids=np.asarray(answer_ids, dtype=np.int32),
                  finished=True, topk_ids=topk_ids,
                  topk_logprobs=None if k is None else np.full((len(answer_ids), k), -1.0, dtype=np.float16),
                  tail_logprobs=None if k is None else np.full(len(answer_ids), -1.0, dtype=np.float32))


def test_perplexity_and_top1_agreement_equal_a_direct_forward(tiny_teacher_dir):
    import math

    import numpy as np

    from edgedistill.evaluate.metrics import teacher_forced_metrics
    from edgedistill.models.hf import load_causal_lm

    model, tokenizer, _ = load_causal_lm(str(tiny_teacher_dir))
    V = model.config.vocab_size
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(3, V, p), rng.integers(3, V, a)) for p, a in ((5, 4), (9, 2), (3, 6))]  # 12 answer tokens
    nll, argmaxes = 0.0, []
    for prompt, answer in pairs:  # each sequence alone, no padding
        with torch.no_grad():
            logits = model(torch.tensor(np.concatenate([prompt, answer]))[None]).logits[0].float()
        logprobs = torch.log_softmax(logits[len(prompt) - 1:-1], -1)  # (A, V): the positions that predict the answer
        nll -= float(logprobs[torch.arange(len(answer)), torch.from_numpy(answer)].sum())
        argmaxes.append(logprobs.argmax(-1).numpy())
    # The cached top-1 is the model's own argmax on the first and last sample and another id on
    # the second: agreement 4 + 0 + 6 of 12 tokens.
    tops = [a if agrees else (a + 1) % V for a, agrees in zip(argmaxes, (True, False, True))]
    samples = [_sample(p, a, topk_ids=np.stack([t, np.zeros_like(t)], 1).astype(np.int32))
               for (p, a), t in zip(pairs, tops)]
    got = teacher_forced_metrics(model, samples, tokenizer.pad_token_id, batch_size=2)  # a padded pair, then one alone
    assert got == pytest.approx({"perplexity": math.exp(nll / 12), "top1_agreement": 10 / 12, "answer_tokens": 12},
                                rel=1e-5)
    # By hand: a head of zeros gives every token the same logit, so the model is uniform over V
    # tokens, its perplexity is V, and its argmax is token 0 (the first of equal values).
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    zeros = [_sample(p, a, topk_ids=np.zeros((len(a), 2), dtype=np.int32)) for p, a in pairs]
    assert teacher_forced_metrics(model, zeros, tokenizer.pad_token_id, batch_size=2) == pytest.approx(
        {"perplexity": V, "top1_agreement": 1.0, "answer_tokens": 12}, rel=1e-5)


def chrf_reference(hypothesis: str, reference: str, max_order: int = 6, beta: float = 2.0) -> float:
    """chrF as sacrebleu 2.x computes it (sacrebleu/metrics/chrf.py; Popović 2015), written out,
    on the 0-1 scale: character n-grams of orders 1-6 with whitespace removed; per order the
    clipped matches over the hypothesis's and the reference's n-grams (precision, recall); both
    averaged over the orders that both sides have; then F-beta with beta = 2 (recall weighs 4×)."""
    from collections import Counter

    hyp, ref = "".join(hypothesis.split()), "".join(reference.split())
    precisions, recalls = [], []
    for n in range(1, max_order + 1):
        h = Counter(hyp[i:i + n] for i in range(len(hyp) - n + 1))
        r = Counter(ref[i:i + n] for i in range(len(ref) - n + 1))
        if h and r:
            matches = sum((h & r).values())
            precisions.append(matches / sum(h.values()))
            recalls.append(matches / sum(r.values()))
    if not precisions:
        return 0.0
    p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    return (1 + beta ** 2) * p * r / (beta ** 2 * p + r) if p + r else 0.0


def test_chrf_follows_sacrebleus_definition_with_hand_computed_values():
    from edgedistill.evaluate.metrics import rouge_by_lang

    # "ab" vs "abc": order 1 P 2/2 R 2/3, order 2 P 1/1 R 1/2, no trigram in "ab":
    # P = 1, R = 7/12, F2 = 5PR / (4P + R) = (35/12) / (55/12) = 7/11.
    assert chrf_reference("ab", "abc") == pytest.approx(7 / 11)
    # "aaaa" vs "aa": matches are clipped to the reference's counts: order 1 P 2/4 R 1, order 2
    # P 1/3 R 1, no trigram in "aa": P = 5/12, R = 1, F2 = (25/12) / (32/12) = 25/32.
    assert chrf_reference("aaaa", "aa") == pytest.approx(25 / 32)
    # 東京です vs 東京都です: order 1 P 4/4 R 4/5; order 2 (東京, です) P 2/3 R 2/4; orders 3 and 4
    # match nothing; order 5 is missing from the hypothesis: P = (1 + 2/3)/4 = 5/12,
    # R = (4/5 + 1/2)/4 = 13/40, F2 = 5PR / (4P + R) = (325/480) / (239/120) = 325/956.
    assert chrf_reference("東京です", "東京都です") == pytest.approx(325 / 956)
    pairs = [("ab", "abc", "en"), ("aaaa", "aa", "en"), ("the cat sat", "thecat sat", "en"),  # spaces ignored: 1
             ("", "empty answer", "en"), ("東京です", "東京都です", "ja"), ("今日は晴れです。", "明日は雨でしょう。", "ja")]
    samples = [_sample([1], [2], answer=ref, lang=lang) for _, ref, lang in pairs]
    got = rouge_by_lang([hyp for hyp, _, _ in pairs], samples)
    by_hand = [chrf_reference(hyp, ref) for hyp, ref, _ in pairs]
    assert by_hand[2] == 1.0 and by_hand[3] == 0.0
    expected = {"chrf": sum(by_hand) / 6, "chrf_en": sum(by_hand[:4]) / 4, "chrf_ja": sum(by_hand[4:]) / 2}
    assert {k: got[k] for k in expected} == pytest.approx(expected, abs=1e-12)


class FixedJudge:
    """A judge backend whose verdict is a fixed rule of the prompt (the LLM is not under test here)."""

    model_id = "rule-judge"

    def __init__(self, rule):
        self.rule, self.usage = rule, Usage()

    def chat(self, batch, sampling=None):
        return [Completion(prompt_ids=[], token_ids=[], text=self.rule(m[-1]["content"]), finished=True) for m in batch]


def test_the_judge_removes_position_bias_and_counts_real_preferences():
    assert parse_verdict("A") == "A" and parse_verdict("Answer B is better") == "B"
    assert parse_verdict("回答Aの方が良い") == "A" and parse_verdict("引き分け") == "TIE" and parse_verdict("hmm") is None
    assert combine("A", "B") == ("win", False) and combine("A", "A") == ("tie", True) and combine(None, "B") == ("tie", False)
    questions, langs = ["q1", "q2", "q3", "q4"], ["en", "ja", "en", "ja"]
    student, baseline = ["a long good answer"] * 4, ["bad"] * 4
    always_a = judge_pairs(FixedJudge(lambda p: "A"), questions, langs, student, baseline, 4)
    assert (always_a.wins, always_a.ties, always_a.losses, always_a.inconsistent) == (0, 4, 0, 4)
    assert always_a.win_rate == 0.5
    def longer(prompt: str) -> str:
        a = prompt.split("Answer A:\n" if "Answer A:" in prompt else "回答A：\n")[1].split("\n\n")[0]
        b = prompt.split("Answer B:\n" if "Answer B:" in prompt else "回答B：\n")[1].split("\n\n")[0]
        return "A" if len(a) > len(b) else "B"
    prefers = judge_pairs(FixedJudge(longer), questions, langs, student, baseline, 4)
    assert (prefers.wins, prefers.losses, prefers.win_rate) == (4, 0, 1.0) and prefers.ci_low == 1.0
    low, high = bootstrap_interval([1.0, 0.0] * 10)
    assert 0.2 < low < 0.5 < high < 0.8


def test_report_shows_the_self_instruct_filters_per_language(tmp_path):
    from edgedistill.evaluate.report import (
        _filters_html,
        _filters_markdown,
        filter_table,
    )
    from edgedistill.run import Ledger

    ledger = Ledger(tmp_path / "run.db")
    assert filter_table(ledger) == ([], [])  # no generate metrics: no table, no section
    ledger.log_metrics("generate", "stage", {"filter_bad_start": 1, "filter_kept": 9, "filter_too_long": 1,
                                             "prompts": 30})
    assert filter_table(ledger) == ([], []) and _filters_markdown(ledger) == ""  # a run from before the split
    ledger.log_metrics("generate", "stage", {
        "filter_kept_en": 5, "filter_kept_ja": 4, "filter_bad_start_en": 1, "filter_too_long_ja": 1,
        "filter_teacher_failed": 2, "filter_near_duplicate": 3, "filter_near_duplicate_ja": 3})
    header, rows = filter_table(ledger)
    assert header == ["outcome", "en", "ja", "all"]
    assert rows == [["kept", "5", "4", "9"], ["bad_start", "1", "0", "1"], ["near_duplicate", "0", "3", "3"],
                    ["teacher_failed", "–", "–", "2"], ["too_long", "0", "1", "1"],
                    # en: 5 of 6 proposed; ja: 4 of 8; all: 9 of 14 (teacher_failed proposed nothing)
                    ["kept share", "83.3%", "50.0%", "64.3%"]]
    markdown = _filters_markdown(ledger)
    assert "### Self-Instruct filters" in markdown and "| kept share | 83.3% | 50.0% | 64.3% |" in markdown
    assert '<table id="filters">' in _filters_html(ledger) and "<td>83.3%</td>" in _filters_html(ledger)
    ledger.close()


@pytest.fixture(scope="module")
def tiny_run(tiny_teacher_dir, tmp_path_factory):
    from edgedistill.pipeline import run_recipe

    recipe = tiny_recipe_for(tiny_teacher_dir, tmp_path_factory.mktemp("runs"))
    return recipe, run_recipe(recipe)


def test_report_md_and_model_card_hold_the_ledgers_numbers(tiny_run):
    from pathlib import Path

    from sacrebleu.metrics import CHRF
    from safetensors.torch import load_file

    from edgedistill.run import open_ledger

    recipe, run = tiny_run
    with open_ledger(run) as ledger:
        evaluate = ledger.metrics("evaluate")
        gguf = ledger.metrics("export")["gguf:q8_0"]
        train = ledger.metrics("train")
    assert train["sft"]["steps"] == train["stage"]["steps"]  # the baseline gets exactly the KD run's steps
    report, card = run.report_path.read_text(), (run.export_dir / "README.md").read_text()
    stored = [json.loads(line) for line in (run.eval_dir / "answers.jsonl").read_text(encoding="utf-8").splitlines()]
    folders = {"teacher": Path(recipe.teacher.local_model), "student_before": run.student_init_dir,
               "student_after": run.student_dir, "student_sft": run.student_sft_dir}
    for row, folder in folders.items():
        m = evaluate[row]
        assert f"{m['perplexity']:.2f}" in report and f"{m['chrf']:.3f}" in report
        weights = sorted(folder.glob("*.safetensors"))
        assert weights and m["size_bytes"] == sum(f.stat().st_size for f in weights)
        parameter_bytes = sum(t.numel() * t.element_size() for f in weights for t in load_file(f).values())
        assert m["peak_rss_bytes"] >= parameter_bytes and m["time_to_first_token_s"] > 0  # the weights were in memory
        # chrF recounted from the answers stored in eval/answers.jsonl (sacrebleu's sentence chrF, mean)
        chrf = [CHRF().sentence_score(r[f"{row}_answer"], [r["reference_answer"]]).score / 100 for r in stored]
        assert len(stored) == evaluate["stage"]["heldout_samples"] and m["chrf"] == pytest.approx(sum(chrf) / len(chrf))
        assert m["task_arith_en_items"] == 3  # (per-item task answers are not stored: no recount of the accuracies)
    assert "SFT baseline (text only)" in report and "GGUF q8_0 (llama.cpp)" in report
    assert f"{gguf['chrf']:.3f}" in report and f"{gguf['chrf']:.3f}" in card
    gguf_bytes = (run.export_dir / f"{recipe.run.name}-q8_0.gguf").stat().st_size
    assert gguf["size_bytes"] == gguf_bytes and gguf["peak_rss_bytes"] >= gguf_bytes
    judge = evaluate["judge"]
    assert judge["wins"] + judge["ties"] + judge["losses"] == evaluate["stage"]["heldout_samples"]
    assert f"{int(judge['wins'])} wins, {int(judge['ties'])} ties" in report
    assert "mc_ja MC log-likelihood (n=3)" in report and str(run.report_html_path) in report
    # Speeds: every row measured in the same interleaved rounds, the anchor beside them in the report.
    speed = evaluate["speed"]
    assert all(evaluate[row]["speed_rounds"] == recipe.evaluate.speed_rounds for row in folders)
    assert speed["speed_anchor_gflops"] > 0 and speed["speed_unreliable"] == float(round(speed["speed_anchor_spread"], 9) > 0.3)
    assert f"median of {recipe.evaluate.speed_rounds} rounds" in report
    assert f"{speed['speed_anchor_gflops']:.1f} GFLOP/s" in report
    # The three students are one cut (same shapes, float32): measured once, the others reuse it and
    # say so; the teacher (more layers) is measured on its own.
    assert "speed_shared" not in evaluate["teacher"] and "speed_shared" not in evaluate["student_before"]
    for row in ("student_after", "student_sft"):
        assert evaluate[row]["speed_shared"] == 1.0
        assert all(evaluate[row][k] == evaluate["student_before"][k]
                   for k in ("decode_tokens_per_s", "prefill_tokens_per_s", "time_to_first_token_s"))
    assert "show that row's measured speed (it does not depend on the weights' values): student after KD, " \
           "SFT baseline (text only)." in report
    # The teacher's greedy held-out answers are the stored ones, not generated a second time.
    from edgedistill.data.store import load_distill_set
    from edgedistill.evaluate.stage import teacher_answers_stored

    heldout = load_distill_set(run, split="heldout")
    assert teacher_answers_stored(recipe, heldout)
    teacher_row = json.loads((run.eval_dir / "models" / "teacher.json").read_text(encoding="utf-8"))
    assert teacher_row["answers"] == [s.answer for s in heldout]


def test_a_moving_anchor_marks_the_speeds_unreliable():
    from edgedistill.evaluate.metrics import anchor_summary

    steady = anchor_summary([10.0, 12.0, 11.0, 13.0])  # moved 30%: still comparable
    assert steady == {"speed_anchor_gflops": 11.5, "speed_anchor_spread": pytest.approx(0.3), "speed_unreliable": 0.0}
    moved = anchor_summary([20.0, 10.0, 19.0])  # halved mid-measurement (this machine drifts up to 2x)
    assert moved["speed_unreliable"] == 1.0 and moved["speed_anchor_spread"] == pytest.approx(1.0)


def test_speed_profile_times_the_first_token_inside_each_generate_call(tiny_teacher_dir):
    """One generate call per prompt (plus one warm-up when asked): the first token's time comes
    from the same call, so it is positive and shorter than the call, and decode speed counts the
    n - 1 tokens after it over the rest of the call."""
    import time

    from edgedistill.data.store import Sample
    from edgedistill.evaluate.metrics import speed_profile
    from edgedistill.models.hf import load_causal_lm

    model, tokenizer, _ = load_causal_lm(str(tiny_teacher_dir))
    calls: list[float] = []
    generate = model.generate

    def timed_generate(*args, **kwargs):
        started = time.perf_counter()
        out = generate(*args, **kwargs)
        calls.append(time.perf_counter() - started)
        return out

    model.generate = timed_generate
    samples = [Sample(f"p{i}", "heldout", "en", "test", "tiny", [{"role": "user", "content": text},
                                                              {"role": "assistant", "content": ""}],
                      np.zeros(0, np.int32), np.zeros(0, np.int32), True)
               for i, text in enumerate(("Name three colours.", "What is two plus two?"))]
    speeds = speed_profile(model, tokenizer, samples, n_tokens=12, warm_up=True)
    assert len(calls) == 3  # the warm-up, then one call per prompt
    measured = calls[1:]
    assert 0 < speeds["time_to_first_token_s"] < sum(measured) / 2
    assert speeds["decode_tokens_per_s"] > 2 * 11 / sum(measured)  # the first tokens' time left out
    calls.clear()
    speed_profile(model, tokenizer, samples, n_tokens=12, warm_up=False)
    assert len(calls) == 2


def test_evaluate_reuses_finished_models_and_redoes_retrained_ones(tiny_run):
    from edgedistill.pipeline import run_recipe

    recipe, run = tiny_run
    models = run.eval_dir / "models"
    stamps = {p.stem: p.stat().st_mtime_ns for p in models.glob("*.json")}
    before = json.loads((models / "student_after.json").read_text())
    (run.eval_dir / "models" / "student_sft.json").unlink()  # as if killed before this model
    weights = run.student_dir / "model.safetensors"
    weights.touch()  # retrained weights (new mtime) must not reuse old numbers
    run_recipe(recipe, only="evaluate")
    now = {p.stem: p.stat().st_mtime_ns for p in models.glob("*.json")}
    assert now["teacher"] == stamps["teacher"] and now["student_before"] == stamps["student_before"]  # reused
    assert now["student_after"] != stamps["student_after"]
    after = json.loads((run.eval_dir / "models" / "student_after.json").read_text())
    assert after["tag"] != before["tag"] and after["metrics"]["perplexity"] == pytest.approx(before["metrics"]["perplexity"])
    assert (run.eval_dir / "models" / "student_sft.json").is_file()
    # `edgedistill evaluate` leaves a fresh report, without the GGUF rows of the (now stale) export.
    report = run.report_path.read_text()
    assert "student after KD" in report and "GGUF q8_0" not in report and "No export yet." in report
    run_recipe(recipe)  # export and report again: the next test reads the whole report
    assert "GGUF q8_0 (llama.cpp)" in run.report_path.read_text()


@pytest.mark.browser
def test_report_html_renders_in_chromium_with_the_ledgers_numbers(tiny_run, chromium_page, tmp_path):
    from matplotlib.image import imread

    from edgedistill.evaluate.report import fmt
    from edgedistill.run import open_ledger

    _, run = tiny_run
    with open_ledger(run) as ledger:
        evaluate = ledger.metrics("evaluate")
    page = chromium_page
    page.set_viewport_size({"width": 1280, "height": 1000})
    page.goto(run.report_html_path.as_uri())
    rows = page.eval_on_selector_all("#quality tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))")
    header = page.eval_on_selector_all("#quality thead th", "cells => cells.map(c => c.textContent)")
    by_label = {r[0]: dict(zip(header, r)) for r in rows}
    for key, label in (("teacher", "teacher"), ("student_after", "student after KD"),
                       ("student_sft", "SFT baseline (text only)")):
        assert by_label[label]["perplexity ↓"] == fmt("f2", evaluate[key]["perplexity"])
        assert by_label[label]["chrF ↑"] == fmt("f3", evaluate[key]["chrf"])
    assert "GGUF q8_0 (llama.cpp)" in by_label and page.locator("#quality td.best").count() >= 3
    assert page.eval_on_selector_all("img", "imgs => imgs.every(i => i.complete && i.naturalWidth > 100)")
    assert page.locator("img").count() == 3  # loss curves, quality vs size, quality vs speed
    assert page.locator("details").count() == evaluate["stage"]["heldout_samples"]
    assert f"{int(evaluate['judge']['wins'])} wins" in page.text_content("#judge")
    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    pixels = imread(shot)
    assert pixels.shape[0] > 1000 and pixels[..., :3].std() > 0.05  # not blank
