"""The train stage: an explicit KD loop on accelerate.Accelerator.

loss = alpha * CE(teacher text) + (1 - alpha) * forward KL(cached sparse top-k + tail target),
on answer tokens only. Offline: the teacher is never loaded, its distribution comes from the
distill set. accelerate gives DDP/FSDP/DeepSpeed, mixed precision and checkpoint state
(`accelerate launch -m edgedistill.cli train ...`); the step itself stays on one screen.

Resume: a checkpoint (model, optimizer, scheduler, RNG) is written at the end of every epoch
into a temporary folder and renamed; a rerun continues after the last complete epoch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler

from edgedistill.console import console, stage_progress
from edgedistill.data.generate import load_distill_set
from edgedistill.distill.batches import answer_logits, collate, to_example
from edgedistill.distill.losses import cross_entropy, forward_kl_sparse
from edgedistill.distill.student import save_model
from edgedistill.errors import UserError
from edgedistill.recipe import Recipe
from edgedistill.run import Ledger, RunDir


@dataclass
class Totals:
    """Work done so far, kept in each checkpoint so a resumed run reports the whole training."""

    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0


def kd_loss(model, batch, alpha_ce: float, head=None) -> tuple[torch.Tensor, dict[str, float]]:
    """The KD step's loss and its parts for logging."""
    logits = answer_logits(model, batch, head)  # (N, V)
    ce = cross_entropy(logits, batch.labels.to(logits.device))
    if batch.topk_ids is None or alpha_ce == 1.0:
        return ce, {"ce": ce.item()}
    kl = forward_kl_sparse(logits, batch.topk_ids.to(logits.device), batch.topk_logprobs.to(logits.device),
                           batch.tail_logprobs.to(logits.device))
    return alpha_ce * ce + (1 - alpha_ce) * kl, {"ce": ce.item(), "kl": kl.item()}


def _last_checkpoint(folder: Path) -> tuple[int, Path] | None:
    done = sorted(folder.glob("epoch-*"), key=lambda p: int(p.name.split("-")[1])) if folder.is_dir() else []
    return (int(done[-1].name.split("-")[1]), done[-1]) if done else None


def _save_checkpoint(accelerator, folder: Path, epoch: int, totals: Totals) -> None:
    """accelerate state into a temp folder, renamed into place; older checkpoints removed."""
    tmp = folder / f".epoch-{epoch}.tmp"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "totals.json").write_text(json.dumps(asdict(totals)), encoding="utf-8")
        os.replace(tmp, folder / f"epoch-{epoch}")
        for old in folder.glob("epoch-*"):
            if old.name != f"epoch-{epoch}":
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _cosine_with_warmup(optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def run_train(recipe: Recipe, run: RunDir, ledger: Ledger) -> dict[str, float]:
    """The KD student; then, with `train.sft_baseline`, the same student trained on the
    teacher's text only (same data, order, steps and seed) — the row every report compares KD to."""
    cfg = recipe.train
    samples = load_distill_set(run, split="train")
    examples = [e for e in (to_example(s, cfg.max_seq_len) for s in samples) if e is not None]
    if not examples:
        raise UserError(f"{run.store_path}: no training samples — run the generate stage first")
    if cfg.alpha_ce < 1.0 and any(e.topk_ids is None for e in examples):
        raise UserError(f"{run.store_path}: samples have no teacher log-probs — set train.alpha_ce = 1.0 "
                        "(sequence-level KD) or regenerate with a white-box teacher")
    record = ledger.stage("train")
    fingerprint = record.fingerprint if record else "adhoc"
    keep = {fingerprint, f"{fingerprint}-sft"}
    for stale in run.checkpoints_dir.glob("*") if run.checkpoints_dir.is_dir() else []:
        if stale.name not in keep:  # checkpoints of an earlier configuration are never resumed from
            shutil.rmtree(stale, ignore_errors=True)
    console.print("training the distilled student" + (" (then the SFT baseline)" if cfg.sft_baseline else ""))
    result = train_student(recipe, run, ledger, examples, alpha_ce=cfg.alpha_ce, out_dir=run.student_dir,
                           checkpoints=run.checkpoints_dir / fingerprint, log_path=run.root / "train_log.jsonl")
    if cfg.sft_baseline:
        console.print("training the SFT baseline (teacher text only, same data and steps)")
        sft = train_student(recipe, run, ledger, examples, alpha_ce=1.0, out_dir=run.student_sft_dir,
                            checkpoints=run.checkpoints_dir / f"{fingerprint}-sft",
                            log_path=run.root / "train_log_sft.jsonl", label="train sft")
        ledger.log_metrics("train", "sft", sft)
    return result


def train_student(recipe: Recipe, run: RunDir, ledger: Ledger, examples: list, *, alpha_ce: float, out_dir: Path,
                  checkpoints: Path, log_path: Path, label: str = "train") -> dict[str, float]:
    """One training run from student_init to `out_dir`, resumable from `checkpoints`."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = recipe.train

    logging.getLogger("accelerate").setLevel(logging.ERROR)  # per-save notes about the tied head
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    set_seed(recipe.run.seed)
    tokenizer = AutoTokenizer.from_pretrained(run.student_init_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(run.student_init_dir, local_files_only=True, use_safetensors=True)
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = _cosine_with_warmup(optimizer, int(cfg.warmup_fraction * total_steps), total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    start_epoch, totals = 0, Totals()
    if (last := _last_checkpoint(checkpoints)) is not None:
        start_epoch, path = last
        accelerator.load_state(str(path))
        totals = Totals(**json.loads((path / "totals.json").read_text(encoding="utf-8")))
        console.print(f"resuming training after epoch {start_epoch} ({path})")
    ledger.log_metrics("train", "stage" if label == "train" else "sft", {"resumed_from_epoch": start_epoch})

    head = accelerator.unwrap_model(model).get_output_embeddings()
    started, capped, epochs_done, new_tokens = time.perf_counter(), False, start_epoch, 0
    deadline = started + cfg.max_minutes * 60 - totals.seconds if cfg.max_minutes else None
    with stage_progress() as progress, log_path.open("a", encoding="utf-8") as log:
        task = progress.add_task(label, total=(cfg.epochs - start_epoch) * steps_per_epoch, rate="")
        for epoch in range(start_epoch, cfg.epochs):
            # One seeded order per epoch, so a resumed run sees the batches it would have seen.
            order = RandomSampler(examples, generator=torch.Generator().manual_seed(recipe.run.seed + epoch))
            loader = accelerator.prepare_data_loader(DataLoader(
                examples, batch_size=cfg.batch_size, sampler=order,
                collate_fn=lambda ex: collate(ex, tokenizer.pad_token_id)))
            for batch in loader:
                with accelerator.autocast():
                    loss, parts = kd_loss(model, batch, alpha_ce, head)
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                totals.steps += 1
                totals.tokens += batch.n_tokens
                new_tokens += batch.n_tokens
                rate = new_tokens / (time.perf_counter() - started)
                log.write(json.dumps({"epoch": epoch, "step": totals.steps, "loss": loss.item(),
                                      **parts, "lr": scheduler.get_last_lr()[0]}) + "\n")
                log.flush()
                progress.update(task, advance=1, rate=f"{rate:.0f} tok/s loss {loss.item():.3f}")
                if deadline and time.perf_counter() > deadline:
                    capped = True
                    break
            if capped:
                break
            epochs_done = epoch + 1
            _save_checkpoint(accelerator, checkpoints, epochs_done,
                             replace(totals, seconds=totals.seconds + time.perf_counter() - started))

    totals.seconds += time.perf_counter() - started
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), tokenizer, out_dir,
                   extra={"trained_from": str(run.student_init_dir),
                          "objective": "ce" if alpha_ce == 1.0 else "ce+forward_kl_sparse", "alpha_ce": alpha_ce})
    accelerator.wait_for_everyone()
    return {"steps": totals.steps, "train_tokens": totals.tokens, "train_seconds": totals.seconds,
            "tokens_per_s": totals.tokens / totals.seconds if totals.seconds else 0.0,
            "capped_by_time": float(capped), "train_samples": len(examples), "epochs_done": epochs_done}
