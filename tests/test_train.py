"""The trainer on a real tiny run: every mode and objective, sampled targets, other students,
LoRA, accumulation, a kill -9 and resume that repeats the uninterrupted loss curve, and two
processes under torchrun following the one-process curve."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import build_tiny_model, build_tiny_spm_tokenizer, subprocess_env

from edgedistill.pipeline import run_recipe
from edgedistill.run import open_ledger


def with_train(recipe, name: str, **train):
    return recipe.model_copy(update={"run": recipe.run.model_copy(update={"name": name}),
                                     "train": recipe.train.model_copy(update={"sft_baseline": False, **train})})


def losses(run) -> dict[int, float]:
    """Step -> loss from train_log.jsonl (the last line per step: a resumed run rewrites some)."""
    lines = [json.loads(line) for line in (run.root / "train_log.jsonl").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines}


@pytest.fixture(scope="module")
def base(tiny_teacher_dir, tmp_path_factory):
    """A tiny run through the student stage; each test trains a copy of it."""
    from conftest import tiny_recipe_for

    recipe = tiny_recipe_for(tiny_teacher_dir, tmp_path_factory.mktemp("runs"))
    run_recipe(recipe, only="generate")
    run_recipe(recipe, only="student")
    return recipe


def copy_run(base, name: str, **train):
    from edgedistill.run import RunDir

    recipe = with_train(base, name, **train)
    src, dst = RunDir.for_recipe(base).root, RunDir.for_recipe(recipe).root
    if not dst.exists():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("student", "student_sft", "checkpoints", "*.jsonl"))
    return recipe


def first_step_loss(recipe, run, mode: str) -> dict[str, float]:
    """The loss of the first optimizer step computed outside the trainer: the same first batch
    (RandomSampler seeded with run.seed + epoch 0 walks torch.randperm over the train samples in
    store order), the student as student_init saved it, each sequence through a plain forward of
    its own (no padding, no fused head), and distill/losses.py on the materialised logits:
    alpha·CE + (1 - alpha)·D on the cached sparse target (offline) or the teacher's dense logits
    (online); CE alone for sft. Means over the batch's answer tokens."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from edgedistill.data.store import load_distill_set
    from edgedistill.distill.losses import Objective, cross_entropy, kd_dense, kd_sparse
    from edgedistill.distill.train import epoch_order  # tested on its own below

    cfg = recipe.train
    samples = [s for s in load_distill_set(run, split="train") if len(s.answer_ids)]  # as the trainer keeps them
    order = epoch_order([len(s.prompt_ids) + len(s.answer_ids) for s in samples], cfg.batch_size,
                        recipe.run.seed + 0, cfg.group_by_length)
    batch = [samples[i] for i in order[:cfg.batch_size]]
    student = AutoModelForCausalLM.from_pretrained(run.student_init_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(recipe.teacher.local_model).eval() if mode == "online" else None
    logits, teacher_logits, labels = [], [], []
    with torch.no_grad():
        for s in batch:
            ids = torch.from_numpy(np.concatenate([s.prompt_ids, s.answer_ids]).astype(np.int64))[None]  # (1, L)
            assert ids.shape[1] <= cfg.max_seq_len  # nothing cut: the whole answer is trained on
            answer = slice(len(s.prompt_ids) - 1, ids.shape[1] - 1)  # logits at p predict token p+1
            logits.append(student(ids).logits[0, answer])
            labels.append(ids[0, len(s.prompt_ids):])
            if teacher is not None:
                teacher_logits.append(teacher(ids).logits[0, answer])
    logits, labels = torch.cat(logits), torch.cat(labels)  # (N, V), (N,)
    ce = cross_entropy(logits, labels)
    if mode == "sft":
        return {"loss": ce.item(), "ce": ce.item()}
    objective = Objective(cfg.objective, cfg.beta, cfg.skew_alpha, cfg.temperature)
    if mode == "online":
        kd = kd_dense(logits, torch.cat(teacher_logits), objective)
    else:
        cat = lambda name: torch.from_numpy(np.concatenate([getattr(s, name) for s in batch]).astype(np.float32))
        kd = kd_sparse(logits, cat("topk_ids").long(), cat("topk_logprobs"), cat("tail_logprobs"), objective)
    return {"loss": (cfg.alpha_ce * ce + (1 - cfg.alpha_ce) * kd).item(), "ce": ce.item(), "kd": kd.item()}


@pytest.mark.parametrize("mode", ["offline", "online", "on_policy", "sft"])
def test_every_mode_trains_and_says_what_it_did(base, mode):
    recipe = copy_run(base, f"mode-{mode}", mode=mode, on_policy_fraction=1.0, on_policy_max_new_tokens=6, epochs=1)
    run = run_recipe(recipe, only="train")
    log = [json.loads(line) for line in (run.root / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, len(log) + 1)) and len(log) >= 2
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    if mode != "on_policy":  # (on-policy answers are sampled by the student: checked below and in their own test)
        # The fused chunked head and the padded batch against plain forwards: float32 rounding only.
        expected = first_step_loss(recipe, run, mode)
        assert {k: log[0][k] for k in expected} == pytest.approx(expected, rel=1e-4, abs=1e-6)
    saved = json.loads((run.student_dir / "edgedistill.json").read_text())
    assert saved["mode"] == mode
    with open_ledger(run) as ledger:
        kd_mode = ledger.meta()["kd_mode"]
    if mode == "sft":
        assert saved["objective"] == "ce" and "SFT" in kd_mode and all("kd" not in r for r in log)
    else:
        assert saved["objective"] == "ce+forward_kl" and mode in kd_mode and all("kd" in r for r in log)
    if mode == "on_policy":  # λ = 1: every batch answered by the student, divergence only
        assert all(r["on_policy"] == 1.0 and r["loss"] == pytest.approx(r["kd"]) for r in log)


@pytest.mark.parametrize("objective", ["reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"])
def test_every_objective_lowers_its_loss_offline(base, objective):
    recipe = copy_run(base, f"obj-{objective}", objective=objective, alpha_ce=0.0, epochs=3, lr=3e-3, warmup_fraction=0.0)
    run = run_recipe(recipe, only="train")
    curve = list(losses(run).values())
    assert all(map(lambda v: v == v, curve)) and sum(curve[-2:]) < sum(curve[:2]), curve


def test_sampled_targets_are_unbiased_and_stored_like_topk():
    from edgedistill.models.hf import sampled_step

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    p = torch.softmax(logits, -1)[0]
    generator = torch.Generator().manual_seed(0)
    mean = torch.zeros(6)
    for _ in range(3000):
        ids, logweights, tail = sampled_step(logits, 4, generator)
        weights = logweights.exp()[0]
        assert weights.sum() == pytest.approx(1.0) and torch.isneginf(tail).all()
        assert len(set(ids[0][weights > 0].tolist())) == int((weights > 0).sum())  # drawn ids are distinct
        mean.scatter_add_(0, ids[0], weights)
    assert torch.allclose(mean / 3000, p, atol=0.015)  # E[weight] = p: no top-k bias


def test_a_sampled_distill_set_trains(base):
    recipe = copy_run(base, "sampled", epochs=1)
    recipe = recipe.model_copy(update={"generate": recipe.generate.model_copy(update={"sparse_target": "sampled"})})
    for stage in ("generate", "student", "train"):
        run = run_recipe(recipe, only=stage)
    from edgedistill.data.store import load_distill_set

    samples = load_distill_set(run, split="train")
    weights = torch.from_numpy(samples[0].topk_logprobs.astype("float32")).exp()
    assert torch.allclose(weights.sum(-1), torch.ones(len(weights)), atol=1e-2)
    # Computed outside the trainer: the student's divergence from the stored sampled targets
    # over the whole training set falls from student_init to the trained student.
    before, after = (sampled_divergence(folder, samples, recipe.train) for folder in (run.student_init_dir, run.student_dir))
    assert after < before, (before, after)


def sampled_divergence(folder, samples, cfg) -> float:
    """The recipe's divergence (distill/losses.py kd_sparse) of a saved student from the stored
    sparse targets, mean over every answer token, each sequence in a forward of its own."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from edgedistill.distill.losses import Objective, kd_sparse

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    objective = Objective(cfg.objective, cfg.beta, cfg.skew_alpha, cfg.temperature)
    total, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            ids = torch.from_numpy(np.concatenate([s.prompt_ids, s.answer_ids]).astype(np.int64))[None]
            logits = model(ids).logits[0, len(s.prompt_ids) - 1:-1]  # (T, V): the answer positions
            kd = kd_sparse(logits, torch.from_numpy(s.topk_ids).long(), torch.from_numpy(s.topk_logprobs).float(),
                           torch.from_numpy(s.tail_logprobs).float(), objective)
            total, count = total + kd.item() * len(s.answer_ids), count + len(s.answer_ids)
    return total / count


def test_another_vocabulary_without_teacher_logprobs_falls_back_to_sequence_level_kd(base, tmp_path):
    """Text-only answers (a server that gave no log-probs) have nothing to align: the student of
    another vocabulary trains on the teacher's text and the ledger says so. (With log-probs it
    trains on them across tokenizers: tests/test_xtok.py.)"""
    import sqlite3

    other = tmp_path / "spm-student"
    tokenizer = build_tiny_spm_tokenizer()
    build_tiny_model(tokenizer, layers=2).save_pretrained(other)
    tokenizer.save_pretrained(other)
    recipe = copy_run(base, "other-vocab-text-only", epochs=1)
    recipe = recipe.model_copy(update={"student": recipe.student.model_copy(update={"init": "checkpoint",
                                                                                    "model": str(other)})})
    from edgedistill.run import RunDir

    with sqlite3.connect(RunDir.for_recipe(recipe).store_path) as db:
        db.execute("UPDATE samples SET k = 0, topk_ids = NULL, topk_logprobs = NULL, tail_logprobs = NULL")
    run_recipe(recipe, only="student")
    run = run_recipe(recipe, only="train")
    with open_ledger(run) as ledger:
        assert "sequence-level KD" in ledger.meta()["kd_mode"]
        train = ledger.metrics("train")["stage"]
    assert train["vocab_mismatch_fallback"] == 1.0 and train["xtok_byte_coverage"] == 0.0
    assert all("kd" not in r for r in map(json.loads, (run.root / "train_log.jsonl").read_text().splitlines()))
    assert (run.student_dir / "tokenizer.json").read_text() == (other / "tokenizer.json").read_text()


def test_a_fresh_config_student_and_lora_with_checkpointing_and_accumulation(base):
    recipe = copy_run(base, "fresh", epochs=1)
    recipe = recipe.model_copy(update={"student": recipe.student.model_copy(update={
        "init": "config", "config": {"num_hidden_layers": 1, "intermediate_size": 32}})})
    run = run_recipe(recipe, only="student")
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(run.student_init_dir).config.num_hidden_layers == 1
    lora = copy_run(base, "lora", lora=True, lora_r=4, gradient_checkpointing=True, grad_accum_steps=2, epochs=1)
    run = run_recipe(lora, only="train")
    from safetensors.torch import load_file

    weights = load_file(run.student_dir / "model.safetensors")
    initial = load_file(run.student_init_dir / "model.safetensors")
    assert not any("lora" in k for k in weights) and weights.keys() == initial.keys()  # merged on save
    assert any(not torch.equal(weights[k], initial[k]) for k in weights if "q_proj" in k)
    with open_ledger(run) as ledger:
        train = ledger.metrics("train")["stage"]
    batches = -(-int(train["train_samples"]) // lora.train.batch_size)
    assert train["steps"] == -(-batches // 2)  # one optimizer step per 2 batches (and the epoch's last)


def _train_command(run_root) -> list[str]:
    return [sys.executable, "-m", "edgedistill", "train", str(run_root)]


def test_kill_9_mid_training_resumes_on_the_uninterrupted_loss_curve(base):
    settings = dict(epochs=4, batch_size=2, checkpoint_every_steps=1, lr=1e-3)
    straight = run_recipe(copy_run(base, "straight", **settings), only="train")
    expected = losses(straight)
    recipe = copy_run(base, "killed", **settings)
    from edgedistill.run import RunDir

    root = RunDir.for_recipe(recipe).root
    (root / "recipe.toml").write_text(recipe.to_toml())
    process = subprocess.Popen(_train_command(root), env=subprocess_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    log = root / "train_log.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < 5):
        assert process.poll() is None, "training ended before it could be killed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = len(log.read_text().splitlines())
    assert killed_at < len(expected), "killed too late to test anything"
    resumed = subprocess.run(_train_command(root), env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = losses(RunDir.for_recipe(recipe))
    assert got.keys() == expected.keys()
    for step, value in expected.items():
        assert got[step] == pytest.approx(value, rel=1e-5, abs=1e-6), step


def test_two_processes_under_torchrun_follow_the_one_process_loss_curve(base):
    settings = dict(epochs=2, batch_size=4, lr=1e-3)
    single = losses(run_recipe(copy_run(base, "one-process", **settings), only="train"))
    recipe = copy_run(base, "two-processes", **settings)
    from edgedistill.run import RunDir

    root = RunDir.for_recipe(recipe).root
    (root / "recipe.toml").write_text(recipe.to_toml())
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "edgedistill", "train",
                             str(root)], env=subprocess_env() | {"OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    double = losses(RunDir.for_recipe(recipe))
    assert double.keys() == single.keys() and len(single) >= 4
    for step, value in single.items():  # gloo sums in another order: float32 rounding only
        assert double[step] == pytest.approx(value, rel=1e-4), step
    with open_ledger(RunDir.for_recipe(recipe)) as ledger:
        assert ledger.metrics("train")["stage"]["processes"] == 2


def test_on_policy_answers_are_sampled_in_one_batch_as_each_prompt_alone(tiny_teacher_dir):
    """Left-padded batched sampling gives each prompt the answer it gets alone (near-greedy
    temperature), cut after the end of turn, the prompt kept as it was."""
    import numpy as np

    from edgedistill.distill.batches import Example
    from edgedistill.distill.train import on_policy_batch
    from edgedistill.models.hf import encode_prompts, end_of_turn_ids, load_causal_lm
    from edgedistill.recipe import TrainCfg

    model, tokenizer, _ = load_causal_lm(str(tiny_teacher_dir))
    end_ids = end_of_turn_ids(model, tokenizer)
    questions = ["Hi", "Write three sentences about the sea and the sky.", "日本の首都はどこですか?"]
    prompts = [encode_prompts(tokenizer, [[{"role": "user", "content": q}]])[0] for q in questions]
    assert len({len(p) for p in prompts}) == 3  # different lengths: the padding matters
    examples = [Example(np.array(p, dtype=np.int64), len(p), None, None, None) for p in prompts]
    cfg = TrainCfg(on_policy_max_new_tokens=12, on_policy_temperature=1e-4)
    model.train()
    batch = on_policy_batch(model, examples, cfg, tokenizer.pad_token_id, end_ids, seed=0)
    assert model.training and not model.config.use_cache
    answers = 0
    for row, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        alone = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        end = next((i + 1 for i, t in enumerate(alone) if t in end_ids), len(alone))
        got = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
        assert got == prompt + alone[:end], (row, got[len(prompt):], alone[:end])
        answers += end
    assert len(batch.labels) == answers  # the loss is taken on the sampled answers only


def test_layers_around_the_cut_are_found_from_the_kept_layers():
    from edgedistill.distill.train import layers_around_cut

    assert layers_around_cut(list(range(13)) + list(range(19, 30)), 2) == [11, 12, 13, 14]
    assert layers_around_cut([0, 2, 4], 1) == [0, 1, 2]  # even spacing: a junction at every layer
    assert layers_around_cut([0, 1, 2, 3], 2) == []  # nothing was cut


def test_training_around_the_cut_changes_only_those_layers_and_the_final_norm(base):
    from safetensors.torch import load_file

    recipe = copy_run(base, "around-cut", trainable="around_cut", around_cut_layers=1, epochs=1, lr=1e-3)
    run = run_recipe(recipe, only="train")
    kept = json.loads((run.student_init_dir / "edgedistill.json").read_text())["kept_layers"]
    before, after = load_file(run.student_init_dir / "model.safetensors"), load_file(run.student_dir / "model.safetensors")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    junction = next(j for j in range(1, len(kept)) if kept[j] != kept[j - 1] + 1)
    trained = {f"model.layers.{i}." for i in (junction - 1, junction)}
    assert changed and all(name.startswith(tuple(trained)) or name == "model.norm.weight" for name in changed), changed
    assert "model.embed_tokens.weight" not in changed and any(n.startswith(tuple(trained)) for n in changed)


def test_length_grouped_order_is_a_seeded_permutation_with_less_padding():
    """train.group_by_length: every sample once per epoch, the same order for the same seed
    (resume), and batches that pad far less than the random order, which stays as it was."""
    import random

    import torch
    from torch.utils.data import RandomSampler

    from edgedistill.distill.train import epoch_order

    lengths = [random.Random(i).choice([20, 40, 80, 300]) + i % 7 for i in range(102)]

    def padded(order: list[int]) -> int:
        return sum(max(lengths[i] for i in order[s:s + 8]) * len(order[s:s + 8]) for s in range(0, len(order), 8))

    grouped, shuffled = epoch_order(lengths, 8, 3, True), epoch_order(lengths, 8, 3, False)
    assert sorted(grouped) == list(range(102)) and grouped == epoch_order(lengths, 8, 3, True)
    assert grouped != epoch_order(lengths, 8, 4, True)
    assert shuffled == list(RandomSampler(range(102), generator=torch.Generator().manual_seed(3)))
    assert padded(grouped) < 0.8 * padded(shuffled), (padded(grouped), padded(shuffled), sum(lengths))
    assert max(lengths[i] for i in grouped[:8]) == max(lengths)  # the longest batch first: memory fails early
    from edgedistill.distill.train import Totals

    assert Totals(**{"steps": 3, "epoch": 1, "batches_in_epoch": 5}).order == "random"  # a checkpoint from before
