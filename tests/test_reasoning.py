"""Reasoning traces, piece by piece: the splitter (text, tokens, stream; <think> and harmony), the
thinking switch of a chat template, the final-answer reader on the real GSM8K file, the
verifier, the sentence cut and the student's examples per train.reasoning mode, the Modelfile."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import (
    SHARED_DATA,
    build_tiny_harmony_tokenizer,
    build_tiny_think_tokenizer,
    build_tiny_tokenizer,
)

from edgedistill.data.answers import extract_number
from edgedistill.data.store import Sample
from edgedistill.data.verify import Reference, check, select
from edgedistill.distill.reasoning import build_examples, sentence_cut
from edgedistill.models.reasoning import (
    HARMONY,
    ReasoningStyle,
    Split,
    StreamSplitter,
    render_prompt,
    split_pieces,
    split_text,
    template_style,
)
from edgedistill.models.vocab import VocabMap
from edgedistill.recipe import GenerateCfg, TrainCfg

THINK, OPENED = ReasoningStyle(), ReasoningStyle(opened=True)
HARMONY_TEXT = ("<|channel|>analysis<|message|>User asks 2+3. Answer 5.<|end|>"
                "<|start|>assistant<|channel|>final<|message|>5<|return|>")


@pytest.mark.parametrize("raw, style, expected", [
    ("<think>\nLet me add.\n</think>\n\n5", THINK, Split("Let me add.", "5", True)),  # Qwen3 hybrid
    ("Okay, 2+3.\n</think>\n\nThe answer is 5.", OPENED, Split("Okay, 2+3.", "The answer is 5.", True)),  # R1
    ("<think>\nhm\n</think>\n\nok", OPENED, Split("hm", "ok", True)),  # re-emitted opening tag dropped
    ("Okay, so I need to", OPENED, Split("Okay, so I need to", "", False)),  # cut by max_tokens
    ("<think>\nOkay, so", THINK, Split("Okay, so", "", False)),
    ("Just 5.", THINK, Split(None, "Just 5.", True)),  # no trace at all
    ("<think>a</think> b<think>c</think>d", THINK, Split("a", "b<think>c</think>d", True)),  # first block only
    ("hm</think>5", THINK, Split("hm", "5", True)),  # a stray end tag: the prompt opened the trace
    (HARMONY_TEXT, HARMONY, Split("User asks 2+3. Answer 5.", "5", True)),
    ("<|channel|>analysis<|message|>User asks", HARMONY, Split("User asks", "", False)),
    ("<|channel|>final<|message|>5<|return|>", HARMONY, Split(None, "5", True)),
    ("<|channel|>analysis<|message|>a<|end|><|start|>assistant to=functions.f<|channel|>commentary json"
     "<|message|>{}<|call|>", HARMONY, Split("a", "", True)),  # a tool call: no final answer
])
def test_split_text_follows_the_servers(raw, style, expected):
    assert split_text(raw, style) == expected


def test_token_split_leaves_delimiters_and_edge_whitespace_to_neither_side():
    pieces = ["<", "t", "h", "in", "k", ">", "\n", "in", "in", "\n", "</think>", "\n\n", " e", "in", "<|im_end|>"]
    split = split_pieces(pieces, THINK)  # the opening tag spelt out of pieces, as llama.cpp's grammar did
    assert (split.trace, split.answer, split.closed) == (range(7, 9), range(12, 15), True)
    harmony = ["<|channel|>", "analysis", "<|message|>", "User", " asks", "<|end|>", "<|start|>", "assistant",
               "<|channel|>", "final", "<|message|>", "5", "<|return|>"]
    split = split_pieces(harmony, HARMONY)
    assert (split.trace, split.answer) == (range(3, 5), range(11, 12))
    straddling = ["a", ".</think>", "b"]  # one token holds the end of the trace and the tag
    split = split_pieces(straddling, OPENED)
    assert (split.trace, split.answer) == (range(0, 1), range(2, 3))


@pytest.mark.parametrize("raw, style", [
    ("<think>\nLet me add. 2 and 3.\n</think>\n\nThe answer is 5.", THINK),
    ("Two and three.\n</think>\n\n5 apples", OPENED),
    ("Just an answer, no trace at all.", THINK),
    (HARMONY_TEXT.removesuffix("<|return|>"), HARMONY),
])
def test_streamed_deltas_add_up_to_the_split(raw, style):
    splitter, trace, answer = StreamSplitter(style), "", ""
    for end in range(1, len(raw) + 1):
        t, a = splitter.feed(raw[:end])
        trace, answer = trace + t, answer + a
    t, a = splitter.feed(raw, final=True)
    expected = split_text(raw, style)
    assert (trace + t or None, answer + a) == (expected.trace, expected.answer)


def test_templates_say_how_their_model_thinks_and_how_to_turn_it_off():
    question = [{"role": "user", "content": "2+3?"}]
    qwen3, r1, harmony = build_tiny_think_tokenizer("qwen3"), build_tiny_think_tokenizer("r1"), build_tiny_harmony_tokenizer()
    plain = build_tiny_tokenizer()
    assert template_style(qwen3) == THINK and template_style(r1) == OPENED and template_style(harmony) == HARMONY
    assert template_style(plain) is None and template_style(plain, ("<t>", "</t>")) == ReasoningStyle("think", "<t>", "</t>")
    # The template's own switch where it has one (Qwen3's enable_thinking=False block) ...
    assert render_prompt(qwen3, question, thinking=False, style=THINK).endswith("assistant\n<think>\n\n</think>\n\n")
    assert render_prompt(r1, question, thinking=False, style=OPENED).endswith("assistant\n<think>\n\n</think>\n\n")
    assert render_prompt(r1, question, style=OPENED).endswith("assistant\n<think>\n")
    # ... else an empty trace prefilled.
    tags = template_style(plain, ("<think>", "</think>"))
    assert render_prompt(plain, question, thinking=False, style=tags).endswith("assistant\n<think>\n\n</think>\n\n")
    assert render_prompt(harmony, question, thinking=False, style=HARMONY).endswith(
        "<|start|>assistant<|channel|>analysis<|message|><|end|><|start|>assistant<|channel|>final<|message|>")


def test_the_tiny_gpt_oss_models_template_renders_what_the_harmony_parser_reads():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = build_tiny_harmony_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|return|>", "<|call|>")}
    config = AutoConfig.for_model(
        "gpt_oss", vocab_size=len(tok), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=16, layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 1.0,
                         "original_max_position_embeddings": 256, "beta_fast": 32.0, "beta_slow": 1.0},
        initializer_range=0.2, eos_token_id=list(ids.values()), pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == "GptOssForCausalLM"
    question = [{"role": "user", "content": "What is 2+3?"}]
    prompt = tok.apply_chat_template(question, add_generation_prompt=True, tokenize=False, reasoning_effort="low")
    full = tok.apply_chat_template(question + [{"role": "assistant", "thinking": "2 plus 3 is 5.", "content": "5"}],
                                   tokenize=False)
    assert "Reasoning: low" in prompt and full.startswith(prompt.removesuffix("<|start|>assistant").replace(
        "Reasoning: low", "Reasoning: medium"))
    completion = tok(full[len(prompt.replace("Reasoning: low", "Reasoning: medium")) - len("<|start|>assistant"):],
                     add_special_tokens=False)["input_ids"]
    # Token by token, special tokens kept (skip_special_tokens would glue 'analysis…assistantfinal5').
    pieces = tok.batch_decode([[t] for t in completion], skip_special_tokens=False)
    split = split_pieces(pieces, HARMONY)
    assert tok.decode([completion[i] for i in split.trace]) == "2 plus 3 is 5."
    assert tok.decode([completion[i] for i in split.answer]) == "5"
    assert tok.decode(completion, skip_special_tokens=True).endswith("assistantfinal5")
    # The model runs: teacher-forced logits over the rendered training form.
    enc = tok(full, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        assert torch.isfinite(model(**enc).logits).all()


# ---- final answers and the verifier --------------------------------------------------------------

@pytest.mark.skipif(not (SHARED_DATA / "gsm8k").is_dir(), reason="../shared/data not present")
def test_the_final_number_of_every_gsm8k_solution_is_its_gold():
    lines = (SHARED_DATA / "gsm8k" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) > 7000
    full_width = str.maketrans("0123456789,.-", "０１２３４５６７８９，．－")
    for line in lines:
        answer = json.loads(line)["answer"]
        written = answer.split("####")[-1].strip()
        gold = float(written.replace(",", ""))  # by hand: the text after the marker
        assert extract_number(answer) == gold, answer[-80:]
        # As a teacher would write it: the solution, then its answer in English or Japanese
        # (full-width digits), a marker winning over the numbers written after it.
        body = answer.split("####")[0]
        assert extract_number(f"{body}The answer is {written}. I checked it 2 times.") == gold
        assert extract_number(f"{body}答え：{written.translate(full_width)}個（3回確認）") == gold


@pytest.mark.parametrize("text, number", [
    ("答え：７２個", 72), ("The answer is 1,234.", 1234), ("so \\boxed{42}. Check: 7", 42), ("答えは１２，０００円です", 12000),
    ("Answer: -3.5 then 8", -3.5), ("3 apples and 4 pears", 4), ("no number here", None), ("解答: 5", 5),
])
def test_extract_number(text, number):
    assert extract_number(text) == number


def test_verifier_kinds():
    numeric = Reference("numeric", "72")
    assert check(numeric, "48 + 24 = 72, so the answer is 72.") == "ok"
    assert check(numeric, "答え：７２") == "ok" and check(numeric, "#### 71") == "wrong_answer"
    assert check(numeric, "I do not know") == "no_answer"
    choice = Reference("choice", choices=("ジャングル", "砂漠", "海"), label=1)
    assert check(choice, "砂漠です。") == "ok" and check(choice, "海") == "wrong_answer"
    assert check(choice, "Answer: 1") == "ok" and check(choice, "わかりません") == "no_answer"
    exact = Reference("exact", "Tokyo")
    assert check(exact, "It is Tokyo.") == "wrong_answer" and check(exact, "Answer: tokyo") == "ok"
    regex = Reference("regex", "B", pattern=r"\(([A-D])\)")
    assert check(regex, "I pick (B).") == "ok" and check(regex, "I pick (C).") == "wrong_answer"
    assert check(regex, "no option") == "no_answer"
    assert check(Reference("regex", None, pattern=r"^\d+$"), "42") == "ok"  # a format check without a reference


def _sample(pid: str, n: int, answer: str, trace_tokens: int = 0, finished: bool = True) -> Sample:
    return Sample(pid, "train", "en", "s", "t", [{"role": "user", "content": "q"},
                                                {"role": "assistant", "content": answer}],
                  np.zeros(3, np.int32), np.arange(4, dtype=np.int32), finished, sample=n,
                  reasoning="r" if trace_tokens else None,
                  reasoning_ids=np.arange(trace_tokens, dtype=np.int32) if trace_tokens else None)


def test_rejection_sampling_keeps_the_correct_the_shortest_or_the_majority():
    from edgedistill.data.prompts import Prompt, SeedTask

    task = Prompt("p1", [], "en", "s", "train", SeedTask("q"), Reference("numeric", "5"))
    free = Prompt("p2", [], "en", "s", "train", SeedTask("q"))
    held = Prompt("p3", [], "en", "s", "heldout", SeedTask("q"), Reference("numeric", "5"))
    stored = {"p1": [_sample("p1", 0, "#### 4", 3), _sample("p1", 1, "It is 5", 9), _sample("p1", 2, "5", 4),
                     _sample("p1", 3, "5", 2, finished=False)],
              "p2": [_sample("p2", 0, "Answer: 7"), _sample("p2", 1, "7."), _sample("p2", 2, "Answer: 9")],
              "p3": [_sample("p3", 0, "#### 4")]}
    every = select([task, free, held], stored, GenerateCfg(samples_per_prompt=4, temperature=0.7))
    assert [(s.id, s.sample) for s in every.kept] == [("p1", 1), ("p1", 2), ("p2", 0), ("p2", 1), ("p2", 2),
                                                     ("p3", 0)]
    assert every.rejected == {"wrong_answer": 1, "unfinished": 1} and every.verified_kept == 2
    short = select([task, free, held], stored, GenerateCfg(samples_per_prompt=4, temperature=0.7, keep="shortest",
                                                           self_consistency=True))
    # The majority's two answers are as long as each other: the first is kept.
    assert [(s.id, s.sample) for s in short.kept] == [("p1", 2), ("p2", 0), ("p3", 0)]
    assert short.rejected == {"wrong_answer": 1, "unfinished": 1, "minority": 1} and short.dropped_longer == 2
    assert short.verified_prompts == 2 and short.unsolved_prompts == 0


# ---- the student's target ---------------------------------------------------------------------------

def test_sentence_cut_backs_up_to_the_last_sentence_end():
    tok = build_tiny_tokenizer()
    vocab = VocabMap(tok).id_bytes
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    trace = ids("It is 3.5 now. Then we add two more and get five")
    assert tok.decode(trace[:sentence_cut(trace, vocab, len(trace) - 3)]) == "It is 3.5 now."
    decimal = ids("First part. It is 3.5 and more")
    budget = next(n for n in range(len(decimal)) if tok.decode(decimal[:n]).endswith("3."))
    assert tok.decode(decimal[:sentence_cut(decimal, vocab, budget)]) == "First part."  # not at '3.'

    ja = ids("二と三を足す。答えは五です。さらに確かめると")
    assert tok.decode(ja[:sentence_cut(ja, vocab, len(ja) - 2)]) == "二と三を足す。答えは五です。"
    assert sentence_cut(ids("no sentence end at all here"), vocab, 4) == 4  # a hard cut
    assert sentence_cut(trace, vocab, 1000) == len(trace)  # under the budget: all of it


def _trace_sample(tok, trace: str, answer: str, k: int = 3) -> Sample:
    from edgedistill.models.hf import encode_prompts

    prompt = encode_prompts(tok, [[{"role": "user", "content": "q"}]])[0]
    trace_ids = tok(trace, add_special_tokens=False)["input_ids"]
    answer_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    rng = np.random.default_rng(0)

    def rows(ids):
        top = np.stack([[t, *rng.choice(np.setdiff1d(np.arange(300), [t]), k - 1, replace=False)] for t in ids])
        return (top.astype(np.int32), np.log(np.full((len(ids), k), 0.2)).astype(np.float16),
                np.full(len(ids), np.log(0.4), dtype=np.float32))

    t_ids, t_lp, t_tail = rows(trace_ids)
    a_ids, a_lp, a_tail = rows(answer_ids)
    return Sample("p", "train", "en", "s", "t", [{"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": answer}],
                  np.asarray(prompt, np.int32), np.asarray(answer_ids, np.int32), True, a_ids, a_lp, a_tail,
                  reasoning=trace, reasoning_ids=np.asarray(trace_ids, np.int32), reasoning_topk_ids=t_ids,
                  reasoning_topk_logprobs=t_lp, reasoning_tail_logprobs=t_tail)


def test_full_budget_and_none_targets_keep_the_teachers_rows_only_where_the_context_is_the_teachers():
    tok = build_tiny_think_tokenizer("qwen3")  # the student's own template has <think> tags
    sample = _trace_sample(tok, "Two and three. That makes five. So the sum is five", "The answer is 5.")
    n_prompt, trace, answer = len(sample.prompt_ids), sample.reasoning_ids.tolist(), sample.answer_ids.tolist()
    [full], made = build_examples([sample], TrainCfg(reasoning="full"), tok, same_vocab=True)
    open_ids, close_ids = tok("<think>\n", add_special_tokens=False)["input_ids"], \
        tok("\n</think>\n\n", add_special_tokens=False)["input_ids"]
    assert full.input_ids[n_prompt:].tolist() == open_ids + trace + close_ids + answer
    rows = full.topk_ids
    assert np.array_equal(rows[len(open_ids):len(open_ids) + len(trace)], sample.reasoning_topk_ids)
    assert np.array_equal(rows[-len(answer):], sample.topk_ids)  # the teacher's answer rows, as stored
    tags = np.r_[0:len(open_ids), len(open_ids) + len(trace):len(open_ids) + len(trace) + len(close_ids)]
    assert (full.topk_logprobs[tags, 0] == 0).all() and np.isneginf(full.topk_logprobs[tags, 1:].astype(float)).all()
    assert (rows[tags, 0] == full.input_ids[n_prompt:][tags]).all()  # one-hot on the tag tokens: CE there
    assert made.counts.kd_tokens == len(trace) + len(answer) and made.counts.ce_tokens == len(tags)

    [cut], made = build_examples([sample], TrainCfg(reasoning="budget:8"), tok, same_vocab=True)
    kept = cut.input_ids[n_prompt + len(open_ids):len(cut.input_ids) - len(close_ids) - len(answer)].tolist()
    assert kept == trace[:len(kept)] and len(kept) <= 8 and tok.decode(kept) == "Two and three."
    assert np.array_equal(cut.topk_ids[len(open_ids):len(open_ids) + len(kept)], sample.reasoning_topk_ids[:len(kept)])
    assert (cut.topk_logprobs[-len(answer):, 0] == 0).all()  # the answer after a cut: CE, not the teacher's rows
    assert made.counts.cut_samples == 1 and made.counts.kd_tokens == len(kept)

    [bare], _ = build_examples([sample], TrainCfg(reasoning="none"), tok, same_vocab=True)
    assert bare.input_ids[n_prompt:].tolist() == answer and (bare.topk_logprobs[:, 0] == 0).all()
    # A sample without a trace is the plain example, in every mode.
    plain = _trace_sample(tok, "x", "Hi.")
    plain.reasoning = plain.reasoning_ids = plain.reasoning_topk_ids = None
    from edgedistill.distill.batches import to_example

    [ex], _ = build_examples([plain], TrainCfg(reasoning="budget:2"), tok, same_vocab=True)
    reference = to_example(plain, 512)
    assert np.array_equal(ex.input_ids, reference.input_ids) and np.array_equal(ex.topk_ids, reference.topk_ids)


def test_another_vocabulary_renders_the_trace_as_text_in_the_students_tags():
    tok = build_tiny_tokenizer()  # plain ChatML: the configured pair is used
    sample = _trace_sample(build_tiny_think_tokenizer("qwen3"), "Two and three.", "5")
    [ex], made = build_examples([sample], TrainCfg(reasoning="full", think_tags=("<t>", "</t>")), tok, same_vocab=False)
    text = tok.decode(ex.input_ids[ex.n_prompt:].tolist())
    assert text == "<t>\nTwo and three.\n</t>\n\n5<|im_end|>" and ex.topk_ids is None
    assert made.counts.ce_tokens == len(ex.input_ids) - ex.n_prompt


def test_modelfile_keeps_the_thinking_format():
    from edgedistill.export.ollama import modelfile

    text = modelfile("s.gguf", "<|im_start|>...<think>", ["<|im_end|>"], style=OPENED)
    assert ".Thinking" in text and "<think>\n{{ .Thinking }}\n</think>" in text
    assert '{{ if and $.IsThinkSet (not $.Think) }}<think>\n\n</think>\n\n{{ else }}<think>\n{{ end }}"""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'stop "</think>"' not in text
    assert ".Thinking" not in modelfile("s.gguf", "<|im_start|>", ["<|im_end|>"])  # a plain model: as before
