"""The student as the teacher's speculative-decoding draft, in the real llama.cpp server."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ServeProcess, build_tiny_model, build_tiny_tokenizer

from edgedistill.errors import UserError
from edgedistill.export.draft import NO_DRAFT, DraftOutcome, measure_drafts, summarize
from edgedistill.export.gguf import export_gguf
from edgedistill.models.llamacpp import DraftSettings, start_llamacpp_server

CONVERSATIONS = [[{"role": "user", "content": "Name three fruits."}],
                 [{"role": "user", "content": "日本の首都はどこですか？"}],
                 [{"role": "user", "content": "Distil a model for the edge, then ship it."}]]


def test_summary_is_accepted_over_drafted_and_paired_median_speedups():
    outcomes = {NO_DRAFT: DraftOutcome(tokens=[[1, 2], [3], [5]], tokens_per_s=[10.0, 20.0, 40.0]),
                "after": DraftOutcome(tokens=[[1, 2], [4], [5]], tokens_per_s=[15.0, 20.0, 20.0], drafted=40, accepted=30)}
    summary = summarize(outcomes)
    assert summary[NO_DRAFT] == {"tokens_per_s": 20.0}
    # per-prompt ratios 1.5, 1.0, 0.5 -> median 1.0 (the medians of the speeds alone would say 20/20 too)
    assert summary["after"] == {"acceptance": 0.75, "drafted": 40, "accepted": 30, "tokens_per_s": 20.0,
                                "speedup": 1.0, "identical": 2, "prompts": 3}


@pytest.fixture(scope="module")
def teacher_and_cut(tmp_path_factory) -> tuple[Path, Path, list[list[int]]]:
    """A 4-layer random teacher and its first two layers as a student (same seed, same init
    order: the cut of the teacher, as the student stage makes one), both F16 GGUF."""
    from edgedistill.models.hf import encode_prompts, prepare_tokenizer

    root = tmp_path_factory.mktemp("draft")
    tokenizer = build_tiny_tokenizer()
    prepare_tokenizer(tokenizer)
    files = []
    for layers in (4, 2):
        folder = root / f"l{layers}"
        build_tiny_model(tokenizer, layers=layers).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        files.append(export_gguf(folder, root / f"l{layers}.gguf", "f16", name=f"l{layers}", embeddings_type="f16").path)
    return files[0], files[1], encode_prompts(tokenizer, CONVERSATIONS)


def test_drafts_never_change_greedy_output_and_acceptance_measures_agreement(teacher_and_cut):
    teacher, cut, prompts = teacher_and_cut
    result = measure_drafts(teacher, {"self": teacher, "cut": cut}, prompts, 32, n_max=4, threads=1)
    assert result["self"]["identical"] == result["cut"]["identical"] == len(prompts)
    # The teacher drafting for itself: every proposal is its own greedy token (≥ 97% measured: F16
    # single-token vs batched rounding can break a near-tie); the half-depth cut agrees less.
    assert result["self"]["acceptance"] >= 0.9 and result["self"]["drafted"] >= len(prompts) * 4
    assert 0.0 <= result["cut"]["acceptance"] < result["self"]["acceptance"]
    assert result[NO_DRAFT]["tokens_per_s"] > 0 and result["cut"]["speedup"] > 0


def test_a_missing_draft_file_is_one_line(teacher_and_cut, tmp_path):
    teacher, _, _ = teacher_and_cut
    with pytest.raises(UserError, match=r"nothing\.gguf: GGUF file not found"):
        start_llamacpp_server(teacher, draft=DraftSettings(tmp_path / "nothing.gguf"))


def test_serve_with_a_draft_answers_as_without(teacher_and_cut):
    teacher, cut, _ = teacher_and_cut
    answers = []
    for extra in ((), ("--draft", str(cut))):
        server = ServeProcess(str(teacher), "--parallel", "1", *extra)
        try:
            reply = server.client().chat.completions.create(model=teacher.stem, messages=CONVERSATIONS[2],
                                                            max_tokens=24, temperature=0)
            answers.append(reply.choices[0].message.content)
        finally:
            server.stop()
    assert answers[0] and answers[0] == answers[1]


def test_serve_draft_needs_llamacpp(tmp_path, tiny_teacher_dir):
    from edgedistill.serve.server import draft_for, resolve_model

    with pytest.raises(UserError, match="^--draft: speculative decoding runs in llama.cpp"):
        draft_for(str(tmp_path), resolve_model(str(tiny_teacher_dir)))
