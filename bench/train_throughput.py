"""Benchmark: training throughput of our distillation step against TRL's GKDTrainer, same
teacher (the embedded SmolLM2-135M-Instruct), same student (6 of its 30 layers, evenly
spaced), same batch (4 conversations of ~256 tokens), same CPU, one run.

Ours: `offline` (cached top-32 + tail, the teacher not run), `online` (teacher logits each
step), `on_policy` (λ = 0.5, GKD), `sft` — the step of the train stage (distill/train.py),
timed over `--steps` steps after one warm-up step. TRL: `experimental.gkd.GKDTrainer` at
λ = 0, 0.5 and 1 (β = 0: forward KL, as ours), `max_steps` steps, timed the same way (a
callback marks each step). Tokens/s counts the tokens of the sequences trained on. Prints JSON.

    .venv/bin/pip install 'trl==1.16.0'   # bench-only dependency (pip install -e '.[bench]')
    .venv/bin/python bench/train_throughput.py [--steps 6] [--new-tokens 64]
    .venv/bin/python bench/train_throughput.py --modes offline --lambdas 0 --repeats 5   # the 3x goal alone
    .venv/bin/python bench/train_throughput.py --modes offline,offline@compile --lambdas '' --profile
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import tempfile
import time

import torch
from demo_timings import matmul_gflops  # the shared anchor

from edgedistill.data.prompts import load_prompts
from edgedistill.distill.batches import Example, collate
from edgedistill.distill.student import cut_student, even_layers
from edgedistill.distill.train import make_optimizer, on_policy_batch, step_loss
from edgedistill.models.hf import (
    encode_prompts,
    end_of_turn_ids,
    load_causal_lm,
    score_sequences,
)
from edgedistill.recipe import TrainCfg

BATCH, LENGTH, PROMPT = 4, 256, 64


def conversations(tokenizer, n: int) -> list[list[dict[str, str]]]:
    """Bundled seed prompts with long assistant turns (real text from other seeds), ~LENGTH tokens."""
    prompts = [p.messages[-1]["content"] for p in load_prompts(["bundled:en", "bundled:ja"], 0.2, None)]
    out = []
    for i in range(n):
        answer, j = "", i + 1
        while len(tokenizer(answer)["input_ids"]) < LENGTH - PROMPT:
            answer += prompts[j % len(prompts)] + " "
            j += 7
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"][:LENGTH - PROMPT - 8]
        out.append([{"role": "user", "content": prompts[i % len(prompts)][:160]},
                    {"role": "assistant", "content": tokenizer.decode(ids)}])
    return out


def examples_of(tokenizer, convs) -> list[Example]:
    import numpy as np

    out = []
    for conv in convs:
        prompt = encode_prompts(tokenizer, [conv[:1]])[0][:PROMPT]
        answer = tokenizer(conv[1]["content"], add_special_tokens=False)["input_ids"][:LENGTH - len(prompt)]
        out.append(Example(np.array(prompt + answer, dtype=np.int64), len(prompt), None, None, None))
    return out


def with_targets(teacher, tokenizer, examples: list[Example], k: int = 32) -> list[Example]:
    scored = score_sequences(teacher, tokenizer, [(e.input_ids[:e.n_prompt].tolist(), e.input_ids[e.n_prompt:].tolist())
                                                  for e in examples], k)
    return [Example(e.input_ids, e.n_prompt, c.topk_ids, c.topk_logprobs, c.tail_logprobs)
            for e, c in zip(examples, scored)]


def ours(variant: str, student_factory, teacher, tokenizer, examples, steps: int, new_tokens: int,
         profile: bool = False) -> dict:
    """Time our step in `variant`: a mode, optionally `@compile` (each decoder layer through
    torch.compile, the first steps at each new shape compiling). With `profile`, one more step
    runs under torch.profiler and its top operators by own CPU time are returned."""
    mode, _, option = variant.partition("@")
    cfg = TrainCfg(mode=mode, alpha_ce=1.0 if mode == "sft" else 0.5, on_policy_fraction=0.5,
                   on_policy_max_new_tokens=new_tokens, lr=1e-5)
    model = student_factory()
    model.config.use_cache = False
    model.train()
    if option == "compile":
        for layer in model.model.layers:
            layer.compile()
    optimizer = make_optimizer(model, cfg)
    head, teacher_head = model.get_output_embeddings(), teacher.get_output_embeddings()
    end_ids = end_of_turn_ids(model, tokenizer)
    times, tokens, on_policy_steps = [], [], 0
    top_ops: list[dict] = []
    for step in range(steps + 1 + profile):
        chunk = examples[(step * BATCH) % len(examples):][:BATCH]
        profiler = torch.profiler.profile(record_shapes=True) if step == steps + 1 else contextlib.nullcontext()
        profiler.__enter__()
        started = time.perf_counter()
        batch = collate(chunk, tokenizer.pad_token_id)
        live, cfg_step = (teacher if mode in ("online", "on_policy") else None), cfg
        if mode == "on_policy" and random.Random(step).random() < cfg.on_policy_fraction:
            batch = on_policy_batch(model, chunk, cfg, tokenizer.pad_token_id, end_ids, step)
            cfg_step, on_policy_steps = cfg.model_copy(update={"alpha_ce": 0.0}), on_policy_steps + (step > 0)
        loss, _ = step_loss(model, batch, cfg_step, head, live, teacher_head, use_logits=mode != "sft")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == steps + 1:
            profiler.__exit__(None, None, None)
            top_ops = top_operators(profiler, time.perf_counter() - started)
        elif step:  # the first step is warm-up
            times.append(time.perf_counter() - started)
            tokens.append(batch.n_tokens)
    result = {"tokens_per_s": round(sum(tokens) / sum(times), 1), "median_step_s": round(statistics.median(times), 2),
              "steps": steps, "on_policy_steps": on_policy_steps}
    return result | ({"profiled_step": top_ops} if profile else {})


def top_operators(profiler, wall_s: float, n: int = 14) -> list[dict]:
    """The profiled step's operators by own CPU time (grouped by input shapes), with the matmul
    share of the step: where a step's time goes, from the command that documents it."""
    events = profiler.key_averages(group_by_input_shape=True)
    total_ms = sum(e.self_cpu_time_total for e in events) / 1e3
    matmul_ms = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::addmm_")) / 1e3
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [{"step_wall_s": round(wall_s, 2), "self_cpu_total_ms": round(total_ms), "matmul_ms": round(matmul_ms),
             "matmul_share": round(matmul_ms / total_ms, 3)}] + [
        {"op": e.key, "shapes": str(e.input_shapes)[:80], "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 1)}
        for e in top]


def trl_gkd(lmbda: float, student_factory, teacher, tokenizer, convs, steps: int, new_tokens: int) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    marks: list[float] = []
    tokens: list[int] = []
    on_policy = [0]

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

    class Counting(GKDTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            result = super().training_step(model, inputs, num_items_in_batch)
            tokens.append(int(self._last_tokens))
            return result

        @staticmethod
        def generate_on_policy_outputs(model, inputs, generation_config, *rest, **kwargs):
            on_policy[0] += 1
            return GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config, *rest, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self._last_tokens = int(inputs["attention_mask"].sum())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    with tempfile.TemporaryDirectory() as out:
        args = GKDConfig(output_dir=out, per_device_train_batch_size=BATCH, max_steps=steps + 1, lmbda=lmbda, beta=0.0,
                         temperature=1.0, max_new_tokens=new_tokens, max_length=LENGTH + 64, learning_rate=1e-5,
                         logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                         dataloader_num_workers=0, disable_tqdm=True, seed=0)
        trainer = Counting(model=student_factory(), teacher_model=teacher, args=args, processing_class=tokenizer,
                           train_dataset=Dataset.from_list([{"messages": c} for c in convs]), callbacks=[Clock()])
        started = time.perf_counter()
        trainer.train()
    stamps = [started] + marks
    times = [b - a for a, b in zip(stamps, stamps[1:])][1:]  # drop the warm-up step
    return {"tokens_per_s": round(sum(tokens[1:]) / sum(times), 1), "median_step_s": round(statistics.median(times), 2),
            "steps": len(times), "on_policy_steps_incl_warmup": on_policy[0]}


def ratios(run: dict) -> dict[str, float]:
    """Ours over TRL at the goals' pairings, where both sides were measured in `run`."""
    pairs = {"offline_vs_trl_lambda0": ("offline", "lambda_0.0"), "online_vs_trl_lambda0": ("online", "lambda_0.0"),
             "on_policy_vs_trl_lambda0.5": ("on_policy", "lambda_0.5")}
    return {name: round(run["ours"][mine]["tokens_per_s"] / run["trl_gkd"][theirs]["tokens_per_s"], 2)
            for name, (mine, theirs) in pairs.items() if mine in run["ours"] and theirs in run["trl_gkd"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=64, help="on-policy answer length (ours and TRL)")
    parser.add_argument("--modes", default="offline,online,on_policy,sft",
                        help="our modes to time; a mode@compile runs the student's layers through torch.compile")
    parser.add_argument("--profile", action="store_true", help="profile one extra step of each of our modes")
    parser.add_argument("--lambdas", default="0,0.5,1", help="TRL GKD λ values to time ('' for none)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure everything this many times, each repeat with its own anchor: on a shared "
                             "machine whose speed drifts, the median ratio of the repeats is the figure to quote")
    args = parser.parse_args()
    torch.manual_seed(0)
    modes = [m for m in args.modes.split(",") if m]
    lambdas = [float(x) for x in args.lambdas.split(",") if x]
    teacher, tokenizer, _ = load_causal_lm("embedded")
    teacher.config.use_cache = False
    kept = even_layers(teacher.config.num_hidden_layers, 6)
    student_factory = lambda: cut_student(teacher, kept)  # noqa: E731
    convs = conversations(tokenizer, BATCH * (args.steps + 1))
    examples = with_targets(teacher, tokenizer, examples_of(tokenizer, convs))
    result: dict = {"benchmark": "train_throughput", "teacher": "SmolLM2-135M-Instruct (30 layers)",
                    "student_layers": kept, "batch": BATCH, "sequence_tokens": LENGTH,
                    "threads": torch.get_num_threads(), "runs": []}
    for repeat in range(args.repeats):
        run: dict = {"anchor_matmul_fp32_gflops": round(matmul_gflops(), 1), "ours": {}, "trl_gkd": {}}
        jobs = [("ours", mode, lambda mode=mode: ours(mode, student_factory, teacher, tokenizer, examples,
                                                      args.steps, args.new_tokens, args.profile)) for mode in modes]
        jobs += [("trl_gkd", f"lambda_{lmbda}", lambda lmbda=lmbda: trl_gkd(lmbda, student_factory, teacher, tokenizer,
                                                                            convs, args.steps, args.new_tokens))
                 for lmbda in lambdas]
        for side, name, measure in jobs if repeat % 2 == 0 else jobs[::-1]:  # odd repeats: TRL first (drift)
            run[side][name] = measure()
            print(repeat, side, name, run[side][name], flush=True)
        run.update(ratios(run))
        result["runs"].append(run)
    if args.repeats > 1:
        result["median_of_runs"] = {name: round(statistics.median(run[name] for run in result["runs"]), 2)
                                    for name in ratios(result["runs"][0])}
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
