"""Quality and speed of one model on the held-out prompts, measured against the teacher.

- perplexity of the teacher's answers (teacher forcing, answer tokens only);
- top-1 agreement: the model's argmax equals the teacher's argmax (top-1 of the cached
  top-k) at the same answer position;
- ROUGE-L F1 of the model's greedy answer against the teacher's, on language-aware units
  (Japanese by character, see data/similarity.py);
- chrF (sacrebleu) of the same pairs: character n-grams, whitespace ignored, so it needs no
  word segmentation and suits Japanese as it is;
- speed at batch 1: decode tokens/s, prefill excluded: (n-1) / (t(n tokens) - t(first token));
  prefill tokens/s and time to first token from t(first token), in the same generate call;
- footprint: peak resident memory while the model is loaded and evaluated (Linux VmHWM, reset
  before each model), size on disk, parameters.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from pathlib import Path

import torch

from edgedistill.data.similarity import rouge_l
from edgedistill.data.store import Sample
from edgedistill.distill.batches import answer_logits, collate, to_example
from edgedistill.models.hf import encode_prompts, generate_batch


@torch.inference_mode()
def teacher_forced_metrics(model, samples: list[Sample], pad_id: int, batch_size: int = 8,
                           max_seq_len: int = 2048) -> dict[str, float]:
    nll, agree, count = 0.0, 0, 0
    examples = [e for e in (to_example(s, max_seq_len) for s in samples) if e is not None]
    examples.sort(key=lambda e: len(e.input_ids))  # batches of similar lengths: less padding, same sums
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_id)
        logits = answer_logits(model, batch).float()  # (N, V)
        nll += torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum").item()
        if batch.topk_ids is not None:
            agree += int((logits.argmax(-1) == batch.topk_ids[:, 0]).sum())
        count += len(batch.labels)
    return {"perplexity": math.exp(nll / count) if count else float("nan"),
            "top1_agreement": agree / count if count else float("nan"), "answer_tokens": count}


def greedy_answers(model, tokenizer, samples: list[Sample], max_new_tokens: int, batch_size: int) -> list[str]:
    answers = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        answers += [c.text for c in generate_batch(model, tokenizer, [s.prompt_messages for s in chunk],
                                                   max_new_tokens=max_new_tokens, temperature=0.0,
                                                   top_k_logprobs=None)]
    return answers


def rouge_by_lang(answers: list[str], samples: list[Sample]) -> dict[str, float]:
    """ROUGE-L and chrF against the teacher's answers, overall and per language."""
    from sacrebleu.metrics import CHRF

    chrf = CHRF()
    scores: dict[str, list[float]] = defaultdict(list)
    for answer, sample in zip(answers, samples):
        score = rouge_l(answer, sample.answer)
        scores["rouge_l"].append(score)
        scores[f"rouge_l_{sample.lang}"].append(score)
        char_f = chrf.sentence_score(answer, [sample.answer]).score / 100
        scores["chrf"].append(char_f)
        scores[f"chrf_{sample.lang}"].append(char_f)
    return {name: sum(v) / len(v) for name, v in scores.items()}


def reset_peak_rss() -> None:
    """Start a new peak-memory window for this process (Linux: clear_refs 5 resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_bytes(pid: int | str = "self") -> float | None:
    """Peak resident memory (VmHWM) of a process since its last reset; None where /proc is missing."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def size_on_disk(path: str | Path) -> float:
    """Bytes of a model file, or of the weight files (safetensors/GGUF) in a model folder."""
    path = Path(path)
    if path.is_file():
        return float(path.stat().st_size)
    return float(sum(f.stat().st_size for f in path.glob("*") if f.suffix in (".safetensors", ".gguf")))


@torch.inference_mode()
def matmul_gflops(n: int = 1024, repeat: int = 5) -> float:
    """The machine's speed right now: float32 matmul GFLOP/s at the threads torch uses. The anchor
    beside every speed we report (bench/demo_timings.py measures the same)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    started = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2 * n**3 * repeat / (time.perf_counter() - started) / 1e9


UNRELIABLE_SPREAD = 0.3  # the anchor moved more than this during a measurement: speeds are not comparable


def interleaved_speeds(models: dict, samples: list[Sample], n_tokens: int, rounds: int = 3
                       ) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Each model's speed_profile measured in turns (A B C, A B C, …) and its median per model,
    with the matmul anchor measured before every round and after the last. A shared machine
    whose speed drifts (up to 2x here) then slows every model alike in a round, and the spread
    of the anchor says whether the numbers can be compared at all: `speed_unreliable` = 1 when
    it moved more than 30%. `models`: {name: (model, tokenizer)}."""
    import statistics

    anchors = [matmul_gflops()]
    draws: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    for round_ in range(rounds):
        for name, (model, tokenizer) in models.items():
            draws[name].append(speed_profile(model, tokenizer, samples, n_tokens, warm_up=round_ == 0))
        anchors.append(matmul_gflops())
    medians = {name: {key: statistics.median(d[key] for d in runs) for key in runs[0]} | {"speed_rounds": rounds}
               for name, runs in draws.items()}
    return medians, anchor_summary(anchors)


def anchor_summary(anchors: list[float]) -> dict[str, float]:
    """The anchor's median, how far it moved (max/min - 1), and whether that makes the speeds
    measured beside it unreliable (moved more than 30%)."""
    import statistics

    spread = max(anchors) / min(anchors) - 1
    return {"speed_anchor_gflops": statistics.median(anchors), "speed_anchor_spread": spread,
            "speed_unreliable": float(round(spread, 9) > UNRELIABLE_SPREAD)}


def speed_profile(model, tokenizer, samples: list[Sample], n_tokens: int, warm_up: bool = True) -> dict[str, float]:
    """Batch-1 speed on real prompts: decode tokens/s (prefill excluded; every prompt forced to
    n_tokens new tokens), prefill tokens/s and time to first token, all from one generate call
    per prompt (the first token's time taken by a streamer as it comes out). `warm_up`: one short
    call first, so first-call allocations are not counted (needed once per loaded model)."""
    from transformers.generation.streamers import BaseStreamer

    class FirstTokenClock(BaseStreamer):
        """generate() puts the prompt, then each new token: the second put is the first token."""

        def __init__(self) -> None:
            self.puts, self.first_token_at = 0, 0.0

        def put(self, value) -> None:
            self.puts += 1
            if self.puts == 2:
                self.first_token_at = time.perf_counter()

        def end(self) -> None:
            pass

    def timed(prompt_ids: list[int], n: int) -> tuple[float, float]:
        """(seconds to the first token, seconds for all n)."""
        ids, clock = torch.tensor([prompt_ids]), FirstTokenClock()
        started = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, temperature=None, top_p=None, top_k=None,
                       pad_token_id=tokenizer.pad_token_id, streamer=clock)
        return clock.first_token_at - started, time.perf_counter() - started

    prompts = encode_prompts(tokenizer, [s.prompt_messages for s in samples])
    if warm_up:
        timed(prompts[0], 2)
    first, total = zip(*(timed(p, n_tokens) for p in prompts))
    decode_seconds = sum(total) - sum(first)
    return {"decode_tokens_per_s": len(prompts) * (n_tokens - 1) / max(decode_seconds, 1e-9),
            "prefill_tokens_per_s": sum(map(len, prompts)) / max(sum(first), 1e-9),
            "time_to_first_token_s": sum(first) / len(first)}
