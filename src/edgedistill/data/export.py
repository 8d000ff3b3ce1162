"""Export the distill set: a Hugging Face `datasets` directory (Arrow, for training elsewhere)
and a JSONL file for humans, both following the ARCHITECTURE.md record contract.

The SQLite store stays the source of truth while generating (row-by-row atomic inserts); the
export is rewritten from it at the end of every generate stage, into a temporary folder that
is renamed into place, so a crash never leaves half a dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from edgedistill.data.store import Sample
from edgedistill.run import atomic_write_text, publish_mode


def _features():
    from datasets import Features, List, Value

    return Features({
        "id": Value("string"), "split": Value("string"), "lang": Value("string"),
        "source": Value("string"), "teacher": Value("string"),
        "messages": List({"role": Value("string"), "content": Value("string")}),
        "prompt_ids": List(Value("int32")), "answer_ids": List(Value("int32")), "finished": Value("bool"),
        "topk_ids": List(List(Value("int32"))), "topk_logprobs": List(List(Value("float16"))),
        "tail_logprobs": List(Value("float32")),
        # The teacher's trace, apart from the answer (empty for answers without one).
        "sample": Value("int32"), "reasoning": Value("string"), "reasoning_ids": List(Value("int32")),
        "reasoning_topk_ids": List(List(Value("int32"))), "reasoning_topk_logprobs": List(List(Value("float16"))),
        "reasoning_tail_logprobs": List(Value("float32")),
    })


def _rows(array) -> list:
    return [] if array is None else array.tolist()


def _record(sample: Sample) -> dict:
    sparse = sample.topk_ids is not None
    return {
        "id": sample.id, "split": sample.split, "lang": sample.lang, "source": sample.source,
        "teacher": sample.teacher, "messages": sample.messages,
        "prompt_ids": sample.prompt_ids.tolist(), "answer_ids": sample.answer_ids.tolist(),
        "finished": sample.finished,
        # Text-only answers (teacher vocabulary did not match) carry empty target lists.
        "topk_ids": sample.topk_ids.tolist() if sparse else [],
        "topk_logprobs": sample.topk_logprobs.tolist() if sparse else [],
        "tail_logprobs": sample.tail_logprobs.tolist() if sparse else [],
        "sample": sample.sample, "reasoning": sample.reasoning, "reasoning_ids": _rows(sample.reasoning_ids),
        "reasoning_topk_ids": _rows(sample.reasoning_topk_ids),
        "reasoning_topk_logprobs": _rows(sample.reasoning_topk_logprobs),
        "reasoning_tail_logprobs": _rows(sample.reasoning_tail_logprobs),
    }


def _human(sample: Sample) -> dict:
    """The JSONL line: the record without arrays; the trace and the answer's number only when there are."""
    record = {"id": sample.id, "split": sample.split, "lang": sample.lang, "source": sample.source,
              "teacher": sample.teacher, "messages": sample.messages, "finished": sample.finished,
              "answer_tokens": int(len(sample.answer_ids))}
    if sample.sample:
        record["sample"] = sample.sample
    if sample.reasoning is not None:
        record |= {"reasoning": sample.reasoning, "reasoning_tokens": len(_rows(sample.reasoning_ids))}
    return record


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def stored_logit_bytes(sample: Sample) -> int:
    """Bytes of one sample's sparse target as the store keeps them (ids, log-probs, tail)."""
    arrays = (sample.topk_ids, sample.topk_logprobs, sample.tail_logprobs)
    return sum(a.nbytes for a in arrays if a is not None)


def export_distill_set(samples: list[Sample], dataset_dir: Path, jsonl_path: Path) -> dict[str, float]:
    """Write both exports; return sizes, incl. measured bytes per answer token of the logits."""
    from datasets import Dataset, DatasetDict, disable_progress_bars

    disable_progress_bars()  # ours is the stage's; datasets would print one per shard
    by_split: dict[str, list[dict]] = {}
    for sample in samples:
        by_split.setdefault(sample.split, []).append(_record(sample))
    dataset = DatasetDict({split: Dataset.from_list(rows, features=_features()) for split, rows in by_split.items()})
    dataset_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dataset_dir.parent, prefix=f".{dataset_dir.name}."))
    dataset.save_to_disk(str(tmp / "data"))
    publish_mode(tmp / "data")
    old = dataset_dir.with_name(f".{dataset_dir.name}.old")
    if dataset_dir.exists():
        os.replace(dataset_dir, old)
    os.replace(tmp / "data", dataset_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)

    atomic_write_text(jsonl_path, "".join(json.dumps(_human(s), ensure_ascii=False) + "\n" for s in samples))

    sparse = [s for s in samples if s.topk_ids is not None]
    sparse_tokens = sum(len(s.answer_ids) for s in sparse)
    answer_tokens = sum(len(s.answer_ids) for s in samples)
    return {
        "logit_bytes_per_token": sum(stored_logit_bytes(s) for s in sparse) / sparse_tokens if sparse_tokens else 0.0,
        "dataset_bytes": float(_folder_bytes(dataset_dir)),
        "dataset_bytes_per_token": _folder_bytes(dataset_dir) / answer_tokens if answer_tokens else 0.0,
        "topk_k": float(np.median([s.topk_ids.shape[1] for s in sparse])) if sparse else 0.0,
    }
