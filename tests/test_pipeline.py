"""The whole path on a tiny random Llama: generate -> student -> train -> evaluate -> report."""

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from edgedistill.data.generate import generation_settings
from edgedistill.data.store import SampleStore
from edgedistill.distill.batches import collate, to_example
from edgedistill.errors import UserError
from edgedistill.pipeline import STAGE_NAMES, run_recipe
from edgedistill.run import open_ledger


def test_end_to_end_then_rerun_reuses_every_stage(tiny_recipe):
    run = run_recipe(tiny_recipe)
    with open_ledger(run) as ledger:
        assert [s.status for s in ledger.stages()] == ["done"] * len(STAGE_NAMES)
        results = {k: v for k, v in ledger.metrics("evaluate").items() if k != "stage"}
        attempts = {s.name: s.attempts for s in ledger.stages()}
    assert set(results) == {"teacher", "student_before", "student_after", "student_sft", "judge", "speed"}
    assert results["teacher"]["top1_agreement"] == 1.0  # greedy answers are the teacher's argmax
    assert results["student_after"]["parameters"] < results["teacher"]["parameters"]
    # The trained student moved towards the teacher on held-out answers.
    assert results["student_after"]["perplexity"] < results["student_before"]["perplexity"]

    report = run.report_path.read_text()
    assert "student after KD" in report and f"{results['teacher']['perplexity']:.2f}" in report
    # The cost ledger: a local teacher, 8 prompts asked once, no retries, nothing to pay.
    with open_ledger(run) as ledger:
        spent = ledger.usage()
        gen = ledger.metrics("generate", "stage")["stage"]
    [(stage, teacher)] = spent
    assert stage == "generate" and spent[(stage, teacher)]["requests"] == 8
    assert spent[(stage, teacher)].get("cost_usd", 0.0) == 0.0 and gen["pii_scrubbing"] == 0.0
    assert f"| generate | {teacher} | 8 | 0 | 0 |" in report and "off (local teacher)" in report
    assert gen["logit_bytes_per_token"] == 6 * 16 + 4  # k = 16: int32 ids + fp16 log-probs + fp32 tail
    # The edge files: written, run in llama.cpp, measured, and in the report.
    files = sorted(p.name for p in run.export_dir.glob("*.gguf"))
    assert files == ["tiny-f16.gguf", "tiny-q8_0.gguf"] and (run.export_dir / "Modelfile").is_file()
    with open_ledger(run) as ledger:
        export = ledger.metrics("export")
    assert export["parity"]["tokenizer_match"] == 1.0 and export["parity"]["template_match"] == 1.0
    parity = export["parity"]
    assert parity["greedy_match"] + parity["greedy_near_ties"] == parity["greedy_prompts"] == 2
    assert 0 <= export["gguf:q8_0"]["kl_vs_reference"] < 0.05 and export["gguf:q8_0"]["decode_tokens_per_s"] > 0
    assert "## Edge files (GGUF, measured in llama.cpp)" in report and "| q8_0 |" in report
    student = AutoModelForCausalLM.from_pretrained(run.student_dir)  # plain transformers, safetensors
    assert student.config.num_hidden_layers == 2
    assert (run.student_dir / "model.safetensors").is_file()

    run_recipe(tiny_recipe)
    with open_ledger(run) as ledger:
        assert {s.name: s.attempts for s in ledger.stages()} == attempts


def test_generation_resumes_after_the_last_stored_row(tiny_recipe):
    run = run_recipe(tiny_recipe, only="generate")
    settings = generation_settings(tiny_recipe)
    with SampleStore(run.store_path) as store:
        total = store.count(settings)
        first = {s.id: s.answer_ids for s in store.samples(settings)}
    # Simulate a crash after 3 rows: drop the rest and leave the stage 'running'.
    db = sqlite3.connect(run.store_path)
    db.execute("DELETE FROM samples WHERE id NOT IN (SELECT id FROM samples ORDER BY id LIMIT 3)")
    db.commit()
    db.close()
    with open_ledger(run) as ledger:
        ledger.start_stage("generate", ledger.stage("generate").fingerprint)
    run_recipe(tiny_recipe)  # the full run notices the unfinished stage and resumes it
    with open_ledger(run) as ledger:
        stage = ledger.metrics("generate")["stage"]
        assert ledger.stage("generate").status == "done"
    assert stage["requested_prompts"] == total - 3 and stage["prompts"] == total
    with SampleStore(run.store_path) as store:
        again = {s.id: s.answer_ids for s in store.samples(settings)}
    assert again.keys() == first.keys()
    assert all(np.array_equal(first[k], again[k]) for k in first)


def test_a_stage_alone_needs_its_upstream(tiny_recipe):
    with pytest.raises(UserError, match=r"no such run yet .*\(stage 'train' needs the stages before it\)"):
        run_recipe(tiny_recipe, only="train")
    assert not (Path(tiny_recipe.run.runs_dir) / tiny_recipe.run.name).exists()  # nothing half-made
    run_recipe(tiny_recipe, only="generate")
    with pytest.raises(UserError, match="stage 'student' is not done"):
        run_recipe(tiny_recipe, only="train")


def test_stored_targets_line_up_with_answer_tokens(tiny_recipe):
    run = run_recipe(tiny_recipe, only="generate")
    with SampleStore(run.store_path) as store:
        samples = list(store.samples(generation_settings(tiny_recipe), split="train"))
    sample = samples[0]
    assert sample.topk_ids.shape == (len(sample.answer_ids), 16)
    # Greedy: each answer token is the teacher's top-1; the k+1 buckets hold all the mass.
    assert np.array_equal(sample.topk_ids[:, 0], sample.answer_ids)
    mass = np.exp(sample.topk_logprobs.astype(np.float64)).sum(-1) + np.exp(sample.tail_logprobs)
    assert np.allclose(mass, 1.0, atol=2e-3)
    batch = collate([to_example(s, 512) for s in samples[:3]], pad_id=0)
    assert torch.equal(batch.labels, torch.from_numpy(np.concatenate([s.answer_ids for s in samples[:3]])).long())
    assert torch.equal(batch.topk_ids[:, 0], batch.labels)


def test_changed_training_settings_rerun_train_and_later_only(tiny_recipe):
    run = run_recipe(tiny_recipe)
    changed = tiny_recipe.model_copy(update={"train": tiny_recipe.train.model_copy(update={"epochs": 1})})
    run_recipe(changed)
    with open_ledger(run) as ledger:
        attempts = {s.name: s.attempts for s in ledger.stages()}
    assert attempts == {"generate": 1, "student": 1, "train": 2, "evaluate": 2, "export": 2, "report": 2}


def test_training_resumes_from_the_last_checkpoint(tiny_recipe):
    run = run_recipe(tiny_recipe)
    with open_ledger(run) as ledger:
        steps = ledger.metrics("train")["stage"]["steps"]
        fingerprint = ledger.stage("train").fingerprint
        # A crash after the last checkpoint, before the student was saved.
        ledger.start_stage("train", fingerprint)
    import shutil
    shutil.rmtree(run.student_dir)
    assert [p.name for p in (run.checkpoints_dir / fingerprint).iterdir()] == [f"step-{int(steps)}"]
    run_recipe(tiny_recipe)
    with open_ledger(run) as ledger:
        train = ledger.metrics("train")["stage"]
        attempts = {s.name: s.attempts for s in ledger.stages()}
    assert train["resumed_from_step"] == steps and train["steps"] == steps  # totals carried over
    assert (run.student_dir / "model.safetensors").is_file()
    # train: the first run, the simulated crashed attempt, the resume; later stages reran.
    assert attempts == {"generate": 1, "student": 1, "train": 3, "evaluate": 2, "export": 2, "report": 2}


def test_a_single_stage_command_makes_later_stages_stale(tiny_recipe):
    run = run_recipe(tiny_recipe)
    run_recipe(tiny_recipe, only="train")
    with open_ledger(run) as ledger:
        status = {s.name: s.status for s in ledger.stages()}
    assert status == {"generate": "done", "student": "done", "train": "done", "evaluate": "stale", "export": "stale",
                      "report": "stale"}
    run_recipe(tiny_recipe)
    with open_ledger(run) as ledger:
        assert {s.name: s.attempts for s in ledger.stages()}["evaluate"] == 2


def test_edited_seed_files_make_generation_rerun(tiny_recipe, tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(f'{{"instruction": "Task {i}"}}\n' for i in range(5)))
    recipe = tiny_recipe.model_copy(update={"generate": tiny_recipe.generate.model_copy(
        update={"seeds": [str(seeds)], "limit_per_source": None})})
    run = run_recipe(recipe, only="generate")
    seeds.write_text(seeds.read_text() + '{"instruction": "Task 5"}\n')
    run_recipe(recipe, only="generate")
    with open_ledger(run) as ledger:
        stage = ledger.metrics("generate")["stage"]
    assert stage["prompts"] == 6 and stage["requested_prompts"] == 1
