"""The train stage: an explicit distillation loop on accelerate.Accelerator.

loss = alpha_ce * CE(teacher text) + (1 - alpha_ce) * D(teacher ‖ student), answer tokens
only, D any divergence of distill/losses.py. Modes (`train.mode`):
- offline    D on the cached sparse target of the distill set; the teacher is never loaded;
- online     the teacher (in memory) scores each batch: dense logits, or its top-k + tail
             (`online_top_k`), computed on the fly;
- on_policy  GKD (Agarwal et al. 2024, as TRL's GKDTrainer does it): with probability λ a batch's
             answers are sampled from the student itself and scored by the teacher; D only;
- sft        the teacher's text alone (alpha_ce = 1): the baseline.
The LM head and the loss run fused in row chunks (distill/fused.py): the (N, V) logits of a
batch never exist whole, in every mode.
When teacher and student tokenizers differ, the teacher's top-k is aligned onto the
student's tokens by bytes (distill/xtok.py: mapped KL at 1:1 tokens, chunk likelihoods
elsewhere, coverage in the ledger); only samples without teacher log-probs fall back to
sequence-level KD (the teacher's text, re-tokenised for the student).

Why our own loop and not TRL's trainers: the sparse cached target (the reason the distill set
stays small) is not something TRL's GKD/Distillation trainers consume, and the step has to
stay readable. accelerate supplies what should not be ours: DDP/FSDP/DeepSpeed, mixed
precision, gradient accumulation, and checkpoint state. `split_batches` keeps the global
batch of the recipe whatever the number of processes, and the loss is normalised by the
global token count, so 2 processes follow the 1-process loss curve.

Resume: a checkpoint (model, optimizer, scheduler) is written every `checkpoint_every_steps`
optimizer steps and at each epoch end, into a temporary folder renamed into place; a rerun
continues at the next batch of the same seeded order. Random draws of a step (on-policy
coin and sampling) are seeded by the step number, so a resumed run repeats them exactly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler

from edgedistill.console import console, stage_progress
from edgedistill.data.store import load_distill_set
from edgedistill.distill.batches import (
    Batch,
    Example,
    answer_hidden,
    collate,
)
from edgedistill.distill.fused import (
    DenseTarget,
    SparseTarget,
    default_chunk_rows,
    fused_head_loss,
)
from edgedistill.distill.losses import Objective, cross_entropy, kd_dense, kd_sparse
from edgedistill.distill.reasoning import (
    ReasoningTargets,
    record_reasoning,
)
from edgedistill.distill.xtok import (
    CrossVocab,
    XTokBatch,
    XTokExample,
    collate_xtok,
    coverage,
    example_of,
    live_batch,
    xtok_step_loss,
)
from edgedistill.errors import UserError
from edgedistill.models.hf import save_model
from edgedistill.models.vocab import vocab_matches
from edgedistill.recipe import Recipe, TrainCfg
from edgedistill.run import Ledger, RunDir, atomic_write_text, is_main_process


@dataclass
class Totals:
    """Work done so far, kept in each checkpoint so a resumed run reports the whole training."""

    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    epoch: int = 0  # the epoch in progress
    batches_in_epoch: int = 0  # loader batches of that epoch already consumed
    # the batch order the run started with (train.group_by_length): a resumed run keeps it, so it
    # skips exactly the batches it trained on; checkpoints from before the option were "random"
    order: str = "random"


def objective_of(cfg: TrainCfg) -> Objective:
    return Objective(cfg.objective, cfg.beta, cfg.skew_alpha, cfg.temperature)


def _scaled(per_token_mean: torch.Tensor, local_tokens: int, global_tokens: int, world: int) -> torch.Tensor:
    """A process's token-mean loss rescaled so that DDP's gradient average equals the gradient of
    the mean over all tokens of the global batch (processes hold different token counts)."""
    return per_token_mean * (local_tokens * world / max(global_tokens, 1))


def epoch_order(lengths: list[int], batch_size: int, seed: int, group_by_length: bool) -> list[int]:
    """The sample order of one epoch, seeded: random, or length-grouped (transformers'
    `get_length_grouped_indices`: random megabatches of about 50 batches, or fewer for a small set,
    each sorted by length, the longest batch first) so a batch's sequences need little padding.
    On a CPU the padded positions cost as much as real ones."""
    generator = torch.Generator().manual_seed(seed)
    if not group_by_length:
        return list(RandomSampler(range(len(lengths)), generator=generator))
    from transformers.trainer_pt_utils import get_length_grouped_indices

    return [int(i) for i in get_length_grouped_indices(lengths, batch_size, generator=generator)]


def step_loss(model, batch: Batch, cfg: TrainCfg, head=None, teacher=None, teacher_head=None,
              use_logits: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one (sub)batch as a mean over its answer tokens, and its parts for logging.

    The head and the loss run fused in row chunks (distill/fused.py); a head that is not a
    plain Linear (LoRA on lm_head) gets the materialised logits and distill/losses.py instead."""
    if isinstance(batch, XTokBatch) and use_logits and cfg.alpha_ce < 1.0:  # another vocabulary
        return xtok_step_loss(model, batch, cfg, head)
    hidden = answer_hidden(model, batch)  # (N, H)
    head = head or model.get_output_embeddings()
    labels = batch.labels.to(hidden.device)
    alpha = 1.0 if not use_logits else cfg.alpha_ce
    target = None if alpha == 1.0 else _target(batch, cfg, teacher, teacher_head, hidden.device)
    if type(head) is torch.nn.Linear:
        return fused_head_loss(hidden, head, labels, ce_weight=alpha, kd_weight=1.0 - alpha,
                               objective=objective_of(cfg), target=target)
    logits = head(hidden)
    ce = cross_entropy(logits, labels)
    if target is None:
        return ce, {"ce": ce.item()}
    if isinstance(target, SparseTarget):
        kd = kd_sparse(logits, target.ids, target.logprobs, target.tail, objective_of(cfg))
    else:
        kd = kd_dense(logits, target.logits_of(0, len(labels)), objective_of(cfg))
    return alpha * ce + (1 - alpha) * kd, {"ce": ce.item(), "kd": kd.item()}


def _target(batch: Batch, cfg: TrainCfg, teacher, teacher_head, device) -> SparseTarget | DenseTarget:
    """What the student is distilled towards: the cached sparse target, or the live teacher's
    logits (dense, or its top-k + tail), produced in row chunks like the student's."""
    if teacher is None:
        return SparseTarget(batch.topk_ids.to(device), batch.topk_logprobs.to(device), batch.tail_logprobs.to(device))
    teacher_head = teacher_head or teacher.get_output_embeddings()
    with torch.no_grad():
        teacher_hidden = answer_hidden(teacher, batch)

    def logits_of(start: int, end: int) -> torch.Tensor:
        with torch.no_grad():
            return teacher_head(teacher_hidden[start:end])

    if not cfg.online_top_k:
        return DenseTarget(logits_of)
    from edgedistill.models.hf import sparse_step

    rows = default_chunk_rows(teacher_head.weight.shape[0])
    parts = [sparse_step(logits_of(s, s + rows), cfg.online_top_k) for s in range(0, len(teacher_hidden), rows)]
    return SparseTarget(*(torch.cat(p) for p in zip(*parts)))


@torch.no_grad()
def on_policy_batch(model, examples: list[Example], cfg: TrainCfg, pad_id: int, end_ids: set[int],
                    seed: int) -> Batch:
    """The same prompts answered by the student, sampled in one batched `generate` (prompts
    left-padded), seeded by the step: the answers the teacher will score. Targets come from the
    live teacher, so the batch carries none."""
    import numpy as np

    from edgedistill.models.hf import left_pad

    unwrapped = getattr(model, "module", model)
    was_training = unwrapped.training
    unwrapped.eval()
    unwrapped.config.use_cache = True
    prompts = [e.input_ids[:e.n_prompt].astype(np.int64) for e in examples]
    input_ids, attention = left_pad([p.tolist() for p in prompts], pad_id)
    width = input_ids.shape[1]
    torch.manual_seed(seed)
    out = unwrapped.generate(input_ids=input_ids.to(unwrapped.device), attention_mask=attention.to(unwrapped.device),
                             max_new_tokens=cfg.on_policy_max_new_tokens, do_sample=True,
                             temperature=cfg.on_policy_temperature, top_p=1.0, top_k=0, pad_token_id=pad_id)
    unwrapped.config.use_cache = False
    unwrapped.train(was_training)
    sampled = []
    for example, prompt, row in zip(examples, prompts, out[:, width:].tolist()):
        end = next((i + 1 for i, t in enumerate(row) if t in end_ids), len(row))
        answer = row[:end] or [next(iter(end_ids))]
        sampled.append(Example(np.concatenate([prompt, np.array(answer, dtype=np.int64)]), example.n_prompt,
                               None, None, None))
    return collate(sampled, pad_id)


def _checkpoints(folder: Path) -> list[Path]:
    done = folder.glob("step-*") if folder.is_dir() else []
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def _remove_unfinished_checkpoints(root: Path) -> None:
    """A process killed while saving (kill -9, power loss) leaves a `.step-N.tmp` folder: never
    a checkpoint (only a finished one is renamed into place), so any under the run's checkpoint
    folders (one per training settings) goes before training starts."""
    for unfinished in root.glob("*/.step-*.tmp") if root.is_dir() else []:
        shutil.rmtree(unfinished, ignore_errors=True)


def _save_checkpoint(accelerator, folder: Path, totals: Totals) -> None:
    """accelerate state into a temp folder, renamed into place; older checkpoints removed."""
    name = f"step-{totals.steps}"
    tmp = folder / f".{name}.tmp"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / "totals.json").write_text(json.dumps(asdict(totals)), encoding="utf-8")
    except BaseException:  # a signal or a full disk mid-save: the unfinished folder goes
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        shutil.rmtree(folder / name, ignore_errors=True)
        os.replace(tmp, folder / name)
        for old in _checkpoints(folder):
            if old.name != name:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _open_log(path: Path, resumed_at_step: int):
    """The loss log of this training: a fresh start begins a fresh log (a retrain with another
    student must not mix its steps into the old curve); a resume keeps the steps up to its
    checkpoint and drops any logged after it, which are about to be redone."""
    kept = []
    if resumed_at_step and path.is_file():
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= resumed_at_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return path.open("a", encoding="utf-8")


def make_optimizer(model, cfg: TrainCfg) -> torch.optim.Optimizer:
    """AdamW over the trainable weights, fused (one kernel for all tensors, on CPU too): the
    step of a 49M-weight student falls from ~0.3 s to ~0.1 s on this machine."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def _cosine_with_warmup(optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _load_teacher(recipe: Recipe):
    from edgedistill.models.hf import load_causal_lm

    if recipe.teacher.backend not in ("hf", "llamacpp"):
        raise UserError(f"train.mode = '{recipe.train.mode}' needs the teacher in memory — use teacher.backend "
                        "'hf' or 'llamacpp' (a remote openai teacher only supports offline and sft)")
    model, tokenizer, _ = load_causal_lm(recipe.teacher.local_model, recipe.teacher.dtype)
    model.config.use_cache = False
    return model, tokenizer


def _examples(recipe: Recipe, run: RunDir, student_tokenizer, same_vocab: bool,
              pair: CrossVocab | None = None) -> tuple[list[Example], ReasoningTargets]:
    """Stored ids and targets with the same vocabulary; with another vocabulary the teacher's
    answer bytes in student tokens with its top-k aligned onto them (`pair`), else its text
    through the student's own tokenizer and chat template; samples with a trace in
    train.reasoning's form (their trace and answer as text when the vocabularies differ)."""
    samples = load_distill_set(run, split="train")
    targets = ReasoningTargets(recipe.train, student_tokenizer, same_vocab)
    examples = [example_of(pair, s, recipe.train.max_seq_len) if pair is not None and s.reasoning is None
                else targets.example(s) for s in samples]
    examples = [e for e in examples if e is not None]
    if pair is not None:  # a trace learnt as text: an aligned example with no teacher rows (CE only)
        examples = [e if isinstance(e, XTokExample) else XTokExample(**{f.name: getattr(e, f.name) for f in fields(e)})
                    for e in examples]
    if not examples:
        raise UserError(f"{run.store_path}: no training samples — run the generate stage first")
    return examples, targets


def run_train(recipe: Recipe, run: RunDir, ledger: Ledger) -> dict[str, float]:
    """The distilled student; then, with `train.sft_baseline`, the same student trained on the
    teacher's text only (same data, order, steps and seed) — the row every report compares to."""
    from transformers import AutoTokenizer

    from edgedistill.models.hf import load_tokenizer

    cfg = recipe.train
    student_tokenizer = AutoTokenizer.from_pretrained(run.student_init_dir, local_files_only=True)
    teacher_tokenizer = load_tokenizer(recipe.teacher.local_model) if recipe.teacher.local_model else None
    same_vocab = teacher_tokenizer is not None and vocab_matches(teacher_tokenizer, student_tokenizer)
    logit_kd = cfg.mode != "sft" and cfg.alpha_ce < 1.0
    pair = None if same_vocab or teacher_tokenizer is None else \
        CrossVocab.build(teacher_tokenizer, student_tokenizer, run.root / "xtok")
    examples, reasoning = _examples(recipe, run, student_tokenizer, same_vocab=same_vocab, pair=pair)
    if reasoning.counts.samples:
        ledger.set_meta("reasoning", f"train.reasoning = '{cfg.reasoning}': {reasoning.describe()}")
        console.print(f"reasoning traces: {reasoning.describe()}")
    xtok_coverage = coverage([e for e in examples if isinstance(e, XTokExample)]) if pair else {}
    if pair and "xtok_byte_coverage" not in xtok_coverage:  # no sample has teacher log-probs
        xtok_coverage = {"xtok_byte_coverage": 0.0, "xtok_mass_coverage": 0.0}
        if logit_kd and cfg.mode == "offline":
            console.print("[yellow]the vocabularies differ and no sample has teacher log-probs: training on the "
                          "teacher's text (sequence-level KD)[/]")
            ledger.set_meta("kd_mode", "sequence-level KD: cross-entropy on the teacher's text, re-tokenised for "
                            "the student (another vocabulary, and no teacher log-probs to align)")
            ledger.log_metrics("train", "stage", {"vocab_mismatch_fallback": 1.0})
            logit_kd = False
    if xtok_coverage:
        ledger.log_metrics("train", "stage", xtok_coverage)
    if logit_kd and not pair and cfg.mode == "offline" and any(e.topk_ids is None for e in examples):
        raise UserError(f"{run.store_path}: samples have no teacher log-probs — set train.mode = 'online' (the "
                        "teacher in memory), train.alpha_ce = 1.0 (sequence-level KD), or regenerate with a "
                        "white-box teacher")
    record = ledger.stage("train")
    fingerprint = record.fingerprint if record else "adhoc"
    keep = {fingerprint, f"{fingerprint}-sft"}
    for stale in run.checkpoints_dir.glob("*") if run.checkpoints_dir.is_dir() else []:
        if stale.name not in keep:  # checkpoints of an earlier configuration are never resumed from
            shutil.rmtree(stale, ignore_errors=True)
    teacher = _load_teacher(recipe)[0] if logit_kd and cfg.mode in ("online", "on_policy") else None
    if logit_kd and pair:
        ledger.set_meta("kd_mode", xtok_words(recipe, xtok_coverage))
    elif logit_kd:
        target = (f"the cached sparse top-{recipe.generate.top_k_logprobs} target" if cfg.mode == "offline"
                  else "the live teacher's logits")
        ledger.set_meta("kd_mode", f"{cfg.mode} logit KD: loss = {cfg.alpha_ce:g}·CE(teacher's text) + "
                        f"{1 - cfg.alpha_ce:g}·{cfg.objective}(teacher ‖ student) on {target}")
    elif cfg.mode == "sft" or cfg.alpha_ce == 1.0:
        ledger.set_meta("kd_mode", "SFT: cross-entropy on the teacher's text (sequence-level KD)")
    console.print(f"training the student: {cfg.mode if logit_kd else 'sequence-level'}, {cfg.objective}"
                  + (" across tokenizers" if logit_kd and pair else "")
                  + (" (then the SFT baseline)" if cfg.sft_baseline else ""))
    result = train_student(recipe, run, ledger, examples, out_dir=run.student_dir, use_logits=logit_kd,
                           teacher=teacher, checkpoints=run.checkpoints_dir / fingerprint,
                           log_path=run.root / "train_log.jsonl", pair=pair)
    result |= xtok_coverage
    if cfg.sft_baseline:
        console.print("training the SFT baseline (teacher text only, same data and steps)")
        # Exactly the KD run's steps, whatever the clock says: a baseline capped earlier would not be fair.
        sft = train_student(recipe, run, ledger, examples, out_dir=run.student_sft_dir, use_logits=False,
                            teacher=None, checkpoints=run.checkpoints_dir / f"{fingerprint}-sft",
                            log_path=run.root / "train_log_sft.jsonl", label="train sft", max_steps=int(result["steps"]))
        ledger.log_metrics("train", "sft", sft)
    if reasoning.counts.samples and is_main_process():  # the trace form it learnt, for serving and evaluation
        record_reasoning(run.student_dir, reasoning)
        if cfg.sft_baseline:
            record_reasoning(run.student_sft_dir, reasoning)
    return result | (reasoning.counts.metrics() if reasoning.counts.samples else {})


def xtok_words(recipe: Recipe, covered: dict[str, float]) -> str:
    """The ledger's `kd_mode` for a student of another vocabulary, in words."""
    cfg = recipe.train
    target = (f"the cached sparse top-{recipe.generate.top_k_logprobs} target" if cfg.mode == "offline"
              else f"the live teacher's top-{cfg.online_top_k or recipe.generate.top_k_logprobs} + tail")
    terms = {"mapped_kl": f"{cfg.objective} on the mapped ids + rest at 1:1 tokens",
             "alm": "ALM chunk likelihoods at n:m groups", "uld": "ULD sorted-probability L1 at group starts",
             "gold": f"GOLD hybrid (JSD({cfg.beta:g}) on exact-string matches + sorted L1) at group starts"}
    kd = " + ".join(f"{w:g}·{terms[name]}" for name, w in cfg.xtok_weights.items() if w > 0)
    return (f"{cfg.mode} cross-tokenizer logit KD: loss = {cfg.alpha_ce:g}·CE(teacher's text in student tokens) + "
            f"{1 - cfg.alpha_ce:g}·({kd}) on {target}, aligned by UTF-8 bytes (answer bytes in 1:1 groups: "
            f"{covered.get('xtok_byte_coverage', 0):.0%}; teacher top-k mass mapped there: "
            f"{covered.get('xtok_mass_coverage', 0):.0%})")


def _prepare_student(cfg: TrainCfg, source: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, use_safetensors=True)
    model.config.use_cache = False
    if cfg.trainable == "around_cut":
        freeze_all_but_the_cut(model, source, cfg.around_cut_layers)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora:  # frozen embeddings: checkpointed blocks still need an input that requires grad
            model.enable_input_require_grads()
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                                 target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM"))
    model.train()
    return model


def layers_around_cut(kept: list[int], width: int) -> list[int]:
    """Student layers within `width` of each junction, where the cut joined teacher layers that
    were not neighbours: kept [0..12, 19..29] with width 2 -> student layers 11..14."""
    junctions = [j for j in range(1, len(kept)) if kept[j] != kept[j - 1] + 1]
    return sorted({i for j in junctions for i in range(max(0, j - width), min(len(kept), j + width))})


def freeze_all_but_the_cut(model, student_init: Path, width: int) -> list[int]:
    """Leave trainable only the layers around the cut and the final norm (train.trainable)."""
    from edgedistill.models.families import decoder_layers

    made = json.loads((student_init / "edgedistill.json").read_text(encoding="utf-8")) \
        if (student_init / "edgedistill.json").is_file() else {}
    if "kept_layers" not in made:
        raise UserError(f"train.trainable = 'around_cut': {student_init} was not cut from the teacher (student.init "
                        f"is '{made.get('init', 'unknown')}') — train 'all' weights")
    trained = layers_around_cut(made["kept_layers"], width)
    prefix, _ = decoder_layers(model)
    inside = tuple(f"{prefix}.{i}." for i in trained)
    for name, parameter in model.named_parameters():
        top_level = not name.startswith(prefix + ".") and "embed" not in name and "lm_head" not in name
        parameter.requires_grad_(name.startswith(inside) or top_level)  # top level: the final norm
    return trained


def _merged(model):
    """The plain transformers model to save: LoRA adapters merged into the weights."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def train_student(recipe: Recipe, run: RunDir, ledger: Ledger, examples: list[Example], *, out_dir: Path,
                  use_logits: bool, teacher, checkpoints: Path, log_path: Path, label: str = "train",
                  max_steps: int | None = None, pair: CrossVocab | None = None) -> dict[str, float]:
    """One training run from student_init to `out_dir`, resumable from `checkpoints`; with
    `max_steps`, exactly that many optimizer steps (no time cap)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    from edgedistill.models.hf import end_of_turn_ids

    cfg = recipe.train
    logging.getLogger("accelerate").setLevel(logging.ERROR)  # per-save notes about the tied head
    # cpu=True where there is no GPU: accelerate then runs torchrun's processes as DDP over gloo.
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    world = accelerator.num_processes
    set_seed(recipe.run.seed)
    tokenizer = AutoTokenizer.from_pretrained(run.student_init_dir, local_files_only=True)
    model = _prepare_student(cfg, run.student_init_dir)
    optimizer = make_optimizer(model, cfg)
    batches_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    if len(examples) % cfg.batch_size and (len(examples) % cfg.batch_size) < world:
        raise UserError(f"train.batch_size: the last batch of {len(examples) % cfg.batch_size} sample(s) cannot be "
                        f"shared by {world} processes — change batch_size or the number of processes")
    total_steps = math.ceil(batches_per_epoch / cfg.grad_accum_steps) * cfg.epochs
    scheduler = _cosine_with_warmup(optimizer, int(cfg.warmup_fraction * total_steps), total_steps)
    # The scheduler is not prepared: accelerate would step it once per process (it assumes each
    # process adds a batch), while here the recipe's batch is the global one, sharded by us.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    if teacher is not None:
        teacher.to(accelerator.device)
    teacher_head = teacher.get_output_embeddings() if teacher is not None else None
    end_ids = end_of_turn_ids(accelerator.unwrap_model(model), tokenizer)

    totals = Totals(order="length" if cfg.group_by_length else "random")
    if accelerator.is_main_process:
        _remove_unfinished_checkpoints(checkpoints.parent)
    if done := _checkpoints(checkpoints):
        accelerator.load_state(str(done[-1]))
        totals = Totals(**json.loads((done[-1] / "totals.json").read_text(encoding="utf-8")))
        console.print(f"resuming {label} after step {totals.steps} ({done[-1]})")
    subject = "stage" if label == "train" else "sft"
    if accelerator.is_main_process:
        ledger.log_metrics("train", subject, {"resumed_from_step": totals.steps})

    head = accelerator.unwrap_model(model).get_output_embeddings()
    started, capped, stopped = time.perf_counter(), False, False
    deadline = started + cfg.max_minutes * 60 - totals.seconds if cfg.max_minutes and max_steps is None else None
    remaining = (cfg.epochs - totals.epoch) * batches_per_epoch - totals.batches_in_epoch
    log = _open_log(log_path, totals.steps) if accelerator.is_main_process else None
    window: list[dict[str, float]] = []  # loss parts of the micro-batches of one optimizer step
    try:
        with stage_progress(disable=not accelerator.is_main_process) as progress:
            task = progress.add_task(label, total=remaining, rate="")
            for epoch in range(totals.epoch, cfg.epochs):
                # One seeded order per epoch: a resumed run sees the batches it would have seen. Every
                # process walks the same global batches and takes its share (split_batches semantics).
                order = epoch_order([len(e.input_ids) for e in examples], cfg.batch_size * cfg.grad_accum_steps,
                                    recipe.run.seed + epoch, totals.order == "length")
                loader = DataLoader(examples, batch_size=cfg.batch_size, sampler=order, collate_fn=lambda ex: ex)
                for index, global_batch in enumerate(loader):
                    if index < totals.batches_in_epoch:
                        continue
                    share = global_batch[accelerator.process_index::world]
                    sync = (index + 1) % cfg.grad_accum_steps == 0 or index + 1 == batches_per_epoch
                    window.append(_train_batch(accelerator, model, optimizer, scheduler, share, cfg, tokenizer, head,
                                               teacher, teacher_head, use_logits, end_ids, recipe.run.seed, totals,
                                               world, sync, _live_top_k(recipe, pair)))
                    totals.batches_in_epoch = index + 1
                    progress.update(task, advance=1)
                    if not sync:
                        continue
                    totals.steps += 1
                    parts = {k: sum(w[k] for w in window) / len(window) for k in window[0] if k != "tokens"}
                    totals.tokens += int(sum(w["tokens"] for w in window))
                    window.clear()
                    rate = totals.tokens / max(totals.seconds + time.perf_counter() - started, 1e-9)
                    if log:
                        log.write(json.dumps({"epoch": epoch, "step": totals.steps, **parts,
                                              "lr": scheduler.get_last_lr()[0]}) + "\n")
                        log.flush()
                    progress.update(task, rate=f"{rate:.0f} tok/s loss {parts['loss']:.3f}")
                    if cfg.checkpoint_every_steps and totals.steps % cfg.checkpoint_every_steps == 0 \
                            and index + 1 < batches_per_epoch:
                        _save_checkpoint(accelerator, checkpoints, replace(
                            totals, seconds=totals.seconds + time.perf_counter() - started))
                    capped = bool(deadline and time.perf_counter() > deadline)
                    if capped or (max_steps and totals.steps >= max_steps):
                        stopped = True
                        break
                if stopped:
                    break
                totals.epoch, totals.batches_in_epoch = epoch + 1, 0
                _save_checkpoint(accelerator, checkpoints,
                                 replace(totals, seconds=totals.seconds + time.perf_counter() - started))
    finally:
        if log:
            log.close()

    totals.seconds += time.perf_counter() - started
    if accelerator.is_main_process:
        objective = "ce" if not use_logits or cfg.alpha_ce == 1.0 else f"ce+{cfg.objective}"
        if pair and objective != "ce":  # e.g. ce+xtok(mapped_kl=1,alm=1)
            objective = "ce+xtok(" + ",".join(f"{k}={w:g}" for k, w in cfg.xtok_weights.items() if w > 0) + ")"
        save_model(_merged(accelerator.unwrap_model(model)), tokenizer, out_dir,
                   extra={"trained_from": str(run.student_init_dir), "objective": objective, "mode": cfg.mode,
                          "alpha_ce": cfg.alpha_ce, "lora": cfg.lora})
    accelerator.wait_for_everyone()
    return {"steps": totals.steps, "train_tokens": totals.tokens, "train_seconds": totals.seconds,
            "tokens_per_s": totals.tokens / totals.seconds if totals.seconds else 0.0,
            "capped_by_time": float(capped), "train_samples": len(examples), "epochs_done": totals.epoch,
            "processes": world}


def _live_top_k(recipe: Recipe, pair: CrossVocab | None) -> tuple[CrossVocab, int] | None:
    """Across vocabularies, what a live teacher's targets need: the pair and its top-k size."""
    return (pair, recipe.train.online_top_k or recipe.generate.top_k_logprobs) if pair else None


def _train_batch(accelerator, model, optimizer, scheduler, share: list[Example], cfg: TrainCfg, tokenizer, head,
                 teacher, teacher_head, use_logits: bool, end_ids: set[int], seed: int, totals: Totals,
                 world: int, sync: bool, cross: tuple[CrossVocab, int] | None = None) -> dict[str, float]:
    """Forward and backward of this process's share of one global batch, and the optimizer step
    when the accumulation window closes (`sync`). Returns the global batch's loss parts."""
    import contextlib

    pad_id = tokenizer.pad_token_id
    batch = (collate_xtok(share, pad_id) if cross else collate(share, pad_id)).to(accelerator.device)
    step_seed = seed * 1_000_003 + totals.epoch * 10_007 + totals.batches_in_epoch
    on_policy = (use_logits and cfg.mode == "on_policy"
                 and random.Random(step_seed).random() < cfg.on_policy_fraction)
    if on_policy:  # GKD: the student's own answers, scored by the teacher; divergence only
        batch = on_policy_batch(model, share, cfg, pad_id, end_ids,
                                step_seed + accelerator.process_index).to(accelerator.device)
        cfg_step = cfg.model_copy(update={"alpha_ce": 0.0})
    else:
        cfg_step = cfg
    if cross and use_logits and (cfg.mode != "offline" or on_policy):  # the live teacher, aligned by bytes
        batch = live_batch(cross[0], share, teacher, cross[1], pad_id,
                           sampled=batch.to("cpu") if on_policy else None).to(accelerator.device)
    local_tokens = len(batch.labels)
    global_tokens = int(accelerator.reduce(torch.tensor(local_tokens, device=accelerator.device), reduction="sum")) \
        if world > 1 else local_tokens
    live_teacher = teacher if use_logits and (cfg.mode != "offline" or on_policy) else None
    with contextlib.nullcontext() if sync else accelerator.no_sync(model):
        with accelerator.autocast():
            loss, parts = step_loss(model, batch, cfg_step, head, live_teacher, teacher_head, use_logits)
        accelerator.backward(_scaled(loss, local_tokens, global_tokens, world) / cfg.grad_accum_steps)
    if sync:
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    # The log holds the loss over the global batch's tokens, whatever the number of processes.
    weighted = torch.tensor([loss.item() * local_tokens, *(v * local_tokens for v in parts.values()),
                             float(batch.n_tokens)], device=accelerator.device)
    if world > 1:
        weighted = accelerator.reduce(weighted, reduction="sum")
    values = weighted.tolist()
    out = {"loss": values[0] / max(global_tokens, 1),
           **{k: v / max(global_tokens, 1) for k, v in zip(parts, values[1:-1])}, "on_policy": float(on_policy)}
    out["tokens"] = values[-1]
    return out
