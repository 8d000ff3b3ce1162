"""Benchmark: what the teacher's logits add, objective by objective — same data, same steps,
same student, one run.

Data: a run's distill set (the demo's: the embedded SmolLM2-135M-Instruct's answers to the
bundled EN/JA seeds). Targets for every variant are recomputed here from the teacher at the
answer positions: top-k + exact tail for k = 8, 32, 64, and a `sampled` target of 32 draws
(the same bytes per token as top-32); `dense` is the teacher's full distribution (online).
Student: the teacher cut to `--layers` evenly spaced layers, trained `--epochs` epochs from
the same initial weights and batch order for every variant. Held-out: KL(teacher ‖ student)
on the teacher's answers (dense, teacher-forced), top-1 agreement, ROUGE-L of greedy answers
against the teacher's. Prints JSON.

    .venv/bin/python bench/kd_vs_sft.py runs/demo [--layers 12] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from demo_timings import matmul_gflops  # the shared anchor

from edgedistill.data.store import load_distill_set
from edgedistill.distill.batches import Example, answer_logits, collate, to_example
from edgedistill.distill.student import cut_student, even_layers
from edgedistill.distill.train import make_optimizer, step_loss
from edgedistill.evaluate.metrics import greedy_answers, rouge_by_lang
from edgedistill.models.hf import load_causal_lm, sampled_step
from edgedistill.recipe import TrainCfg
from edgedistill.run import RunDir

VARIANTS = {  # name: (target, TrainCfg overrides)
    "sft": ("none", {"mode": "sft", "alpha_ce": 1.0}),
    "forward_kl_top32": ("top32", {}),
    "reverse_kl_top32": ("top32", {"objective": "reverse_kl"}),
    "jsd0.5_top32": ("top32", {"objective": "jsd", "beta": 0.5}),
    "skew_forward_kl0.1_top32": ("top32", {"objective": "skew_forward_kl", "skew_alpha": 0.1}),
    "forward_kl_top8": ("top8", {}),
    "forward_kl_top64": ("top64", {}),
    "forward_kl_sampled32": ("sampled32", {}),
    "forward_kl_dense": ("dense", {"mode": "online"}),
}


@torch.no_grad()
def teacher_targets(teacher, examples: list[Example], seed: int = 0) -> dict[str, list[Example]]:
    """Every sparse variant of the teacher's distribution at each example's answer positions."""
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, list[Example]] = {"top8": [], "top32": [], "top64": [], "sampled32": []}
    for e in examples:
        batch = collate([e], 0)
        logprobs = torch.log_softmax(answer_logits(teacher, batch).float(), -1)  # (A, V)
        top_lp, top_ids = logprobs.topk(64, -1)
        for k in (8, 32, 64):
            tail = logprobs.scatter(-1, top_ids[:, :k], float("-inf")).logsumexp(-1)
            out[f"top{k}"].append(Example(e.input_ids, e.n_prompt, top_ids[:, :k].numpy(),
                                          top_lp[:, :k].numpy().astype(np.float16), tail.numpy()))
        ids, lw, tail = sampled_step(logprobs, 32, generator)
        out["sampled32"].append(Example(e.input_ids, e.n_prompt, ids.numpy(), lw.numpy().astype(np.float16),
                                        tail.numpy()))
    return out


def train(student, teacher, examples: list[Example], cfg: TrainCfg, epochs: int, batch_size: int, pad_id: int,
          seed: int, collate_fn=None) -> dict[str, float]:
    """`epochs` over `examples` in a seeded order; `collate_fn` (default: collate with pad_id)
    makes a batch of a list of examples (bench/xtok.py gives the cross-tokenizer one)."""
    student.config.use_cache = False
    student.train()
    optimizer = make_optimizer(student, cfg)
    steps = math.ceil(len(examples) / batch_size) * epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    started, tokens = time.perf_counter(), 0
    head, teacher_head = student.get_output_embeddings(), teacher.get_output_embeddings()
    for epoch in range(epochs):
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for start in range(0, len(order), batch_size):
            chosen = [examples[i] for i in order[start:start + batch_size]]
            batch = collate_fn(chosen) if collate_fn else collate(chosen, pad_id)
            live = teacher if cfg.mode == "online" else None
            loss, _ = step_loss(student, batch, cfg, head, live, teacher_head, use_logits=cfg.mode != "sft")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            tokens += batch.n_tokens
    return {"train_seconds": round(time.perf_counter() - started, 1), "train_tokens": tokens, "steps": steps}


@torch.no_grad()
def heldout_fidelity(student, teacher, tokenizer, samples, examples: list[Example], max_new_tokens: int) -> dict:
    student.eval()
    student.config.use_cache = True
    kl_sum, agree, count = 0.0, 0, 0
    for e in examples:
        batch = collate([e], tokenizer.pad_token_id)
        t = torch.log_softmax(answer_logits(teacher, batch).float(), -1)
        s = torch.log_softmax(answer_logits(student, batch).float(), -1)
        kl_sum += float((t.exp() * (t - s)).sum())
        agree += int((t.argmax(-1) == s.argmax(-1)).sum())
        count += len(t)
    answers = greedy_answers(student, tokenizer, samples, max_new_tokens, 8)
    scores = rouge_by_lang(answers, samples)
    return {"heldout_kl": round(kl_sum / count, 4), "top1_agreement": round(agree / count, 4),
            "rouge_l": round(scores["rouge_l"], 4), "chrf": round(scores["chrf"], 4), "positions": count}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", help="a run folder with a distill set (e.g. runs/demo)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--only", default=None, help="comma-separated variants")
    args = parser.parse_args()
    anchor = matmul_gflops()
    run = RunDir(Path(args.run))
    teacher, tokenizer, _ = load_causal_lm("embedded")
    teacher.config.use_cache = False
    train_samples, heldout = load_distill_set(run, split="train"), load_distill_set(run, split="heldout")
    plain = [e for e in (to_example(s, 512) for s in train_samples) if e is not None]
    targets = teacher_targets(teacher, plain) | {"none": plain, "dense": plain}
    held = [e for e in (to_example(s, 512) for s in heldout) if e is not None]
    kept = even_layers(teacher.config.num_hidden_layers, args.layers)
    result: dict = {"benchmark": "kd_vs_sft", "anchor_matmul_fp32_gflops": round(anchor, 1), "run": args.run,
                    "student_layers": kept, "train_samples": len(plain), "heldout_samples": len(held),
                    "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                    "stored_bytes_per_token": {"top8": 6 * 8 + 4, "top32": 6 * 32 + 4, "top64": 6 * 64 + 4,
                                               "sampled32": 6 * 32 + 4, "dense_fp16": 2 * teacher.config.vocab_size},
                    "variants": {}}
    torch.manual_seed(0)
    before = cut_student(teacher, kept)
    result["student_before"] = heldout_fidelity(before, teacher, tokenizer, heldout, held, args.max_new_tokens)
    print("before", result["student_before"], flush=True)
    names = args.only.split(",") if args.only else list(VARIANTS)
    for name in names:
        target, overrides = VARIANTS[name]
        cfg = TrainCfg(lr=args.lr, **{"alpha_ce": 0.5, **overrides})
        student = cut_student(teacher, kept)
        stats = train(student, teacher, targets[target], cfg, args.epochs, args.batch_size, tokenizer.pad_token_id, 0)
        result["variants"][name] = stats | heldout_fidelity(student, teacher, tokenizer, heldout, held,
                                                            args.max_new_tokens)
        print(name, result["variants"][name], flush=True)
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
