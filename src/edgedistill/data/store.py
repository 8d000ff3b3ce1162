"""The distill set: an append-only SQLite store of teacher answers with their sparse targets.

One row per (teacher, generation settings, prompt); a batch of rows is one transaction, so a
crash loses at most the batch in flight and never leaves half a row. Arrays are stored as raw
little-endian bytes (int32 ids, float16 log-probs, float32 tail), k <= 64, i.e. 6*k+4 bytes per
answer token: 196 bytes at k = 32.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgedistill.errors import UserError
from edgedistill.run import RunDir, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
  key TEXT PRIMARY KEY,           -- hash(teacher, settings, prompt messages)
  id TEXT NOT NULL,               -- hash(prompt messages)
  settings TEXT NOT NULL,         -- fingerprint of teacher + generation settings
  split TEXT NOT NULL, lang TEXT NOT NULL, source TEXT NOT NULL, teacher TEXT NOT NULL,
  messages TEXT NOT NULL,         -- JSON chat, the last message is the teacher's answer
  prompt_ids BLOB NOT NULL, answer_ids BLOB NOT NULL, finished INTEGER NOT NULL, k INTEGER NOT NULL,
  topk_ids BLOB, topk_logprobs BLOB, tail_logprobs BLOB, created_at REAL NOT NULL,
  sample INTEGER NOT NULL DEFAULT 0, reasoning TEXT, reasoning_ids BLOB, reasoning_k INTEGER NOT NULL DEFAULT 0,
  reasoning_topk_ids BLOB, reasoning_topk_logprobs BLOB, reasoning_tail_logprobs BLOB);
CREATE INDEX IF NOT EXISTS samples_settings ON samples (settings, split);
"""
# Columns added after the first release, with their definitions: a store written before them
# gets them (ALTER TABLE), so old run folders load and resume; their rows read as sample 0
# without a trace, which is what they were.
ADDED_COLUMNS = {
    "sample": "INTEGER NOT NULL DEFAULT 0",  # which of the prompt's n answers (generate.samples_per_prompt)
    "reasoning": "TEXT",  # the teacher's trace, apart from the answer in `messages`
    "reasoning_ids": "BLOB",  # its token ids (int32)
    "reasoning_k": "INTEGER NOT NULL DEFAULT 0",
    "reasoning_topk_ids": "BLOB", "reasoning_topk_logprobs": "BLOB", "reasoning_tail_logprobs": "BLOB",
}
COLUMNS = ("key", "id", "settings", "split", "lang", "source", "teacher", "messages", "prompt_ids", "answer_ids",
           "finished", "k", "topk_ids", "topk_logprobs", "tail_logprobs", "created_at", *ADDED_COLUMNS)


@dataclass
class Sample:
    """One distill-set record (ARCHITECTURE.md contract)."""

    id: str
    split: str
    lang: str
    source: str
    teacher: str
    messages: list[dict[str, str]]
    prompt_ids: np.ndarray  # (P,) int32
    answer_ids: np.ndarray  # (T,) int32
    finished: bool
    topk_ids: np.ndarray | None = None  # (T, k) int32
    topk_logprobs: np.ndarray | None = None  # (T, k) float16
    tail_logprobs: np.ndarray | None = None  # (T,) float32
    sample: int = 0  # which of the prompt's answers (generate.samples_per_prompt)
    reasoning: str | None = None  # the teacher's trace (ARCHITECTURE.md: apart from the answer)
    reasoning_ids: np.ndarray | None = None  # (R,) int32
    reasoning_topk_ids: np.ndarray | None = None  # (R, k) int32, when the backend gave them
    reasoning_topk_logprobs: np.ndarray | None = None  # (R, k) float16
    reasoning_tail_logprobs: np.ndarray | None = None  # (R,) float32

    @property
    def key(self) -> str:
        """The prompt id, with the answer's number after the first (n answers per prompt)."""
        return self.id if self.sample == 0 else f"{self.id}#{self.sample}"

    @property
    def answer(self) -> str:
        return self.messages[-1]["content"]

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        return self.messages[:-1]


def sample_key(settings: str, prompt_id: str) -> str:
    return hashlib.sha256(f"{settings}\0{prompt_id}".encode()).hexdigest()[:32]


def _blob(array: np.ndarray | None, dtype: str) -> bytes | None:
    return None if array is None else np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()


def _array(blob: bytes | None, dtype: str, k: int | None = None) -> np.ndarray | None:
    if blob is None:
        return None
    arr = np.frombuffer(blob, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
    return arr.reshape(-1, k) if k else arr


class SampleStore:
    def __init__(self, path: Path):
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        self.db.executescript(SCHEMA)
        have = {row[1] for row in self.db.execute("PRAGMA table_info(samples)")}
        for column, definition in ADDED_COLUMNS.items():
            if column not in have:
                self.db.execute(f"ALTER TABLE samples ADD COLUMN {column} {definition}")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> SampleStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stored_ids(self, settings: str) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT id FROM samples WHERE settings=?", (settings,))}

    def stored_keys(self, settings: str) -> set[str]:
        """`Sample.key` of every stored answer: prompt id, and '#n' for the n-th answer after the first."""
        return {pid if n == 0 else f"{pid}#{n}"
                for pid, n in self.db.execute("SELECT id, sample FROM samples WHERE settings=?", (settings,))}

    def add(self, settings: str, samples: Iterable[Sample]) -> int:
        """Insert samples atomically (all or none); an already stored key is left as it is. The
        first answer of a prompt keeps the key it always had (hash of settings and prompt id)."""
        rows = [(
            sample_key(settings, s.key), s.id, settings, s.split, s.lang, s.source, s.teacher,
            json.dumps(s.messages, ensure_ascii=False), _blob(s.prompt_ids, "int32"), _blob(s.answer_ids, "int32"),
            int(s.finished), 0 if s.topk_ids is None else s.topk_ids.shape[1], _blob(s.topk_ids, "int32"),
            _blob(s.topk_logprobs, "float16"), _blob(s.tail_logprobs, "float32"), time.time(),
            s.sample, s.reasoning, _blob(s.reasoning_ids, "int32"),
            0 if s.reasoning_topk_ids is None else s.reasoning_topk_ids.shape[1], _blob(s.reasoning_topk_ids, "int32"),
            _blob(s.reasoning_topk_logprobs, "float16"), _blob(s.reasoning_tail_logprobs, "float32"),
        ) for s in samples]
        with transaction(self.db):
            before = self.db.total_changes
            # ON CONFLICT(key) skips stored keys only; OR IGNORE would also drop rows that break NOT NULL.
            self.db.executemany(f"INSERT INTO samples ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
                                "ON CONFLICT(key) DO NOTHING", rows)
            return self.db.total_changes - before

    def samples(self, settings: str, split: str | None = None) -> Iterator[Sample]:
        sql = ("SELECT id, split, lang, source, teacher, messages, prompt_ids, answer_ids, finished, k, "
               "topk_ids, topk_logprobs, tail_logprobs, sample, reasoning, reasoning_ids, reasoning_k, "
               "reasoning_topk_ids, reasoning_topk_logprobs, reasoning_tail_logprobs FROM samples WHERE settings=?")
        args: list[str] = [settings]
        if split:
            sql += " AND split=?"
            args.append(split)
        for row in self.db.execute(sql + " ORDER BY id, sample", args):
            (pid, spl, lang, source, teacher, messages, p_ids, a_ids, finished, k, t_ids, t_lp, tail,
             n, reasoning, r_ids, r_k, r_t_ids, r_t_lp, r_tail) = row
            yield Sample(pid, spl, lang, source, teacher, json.loads(messages), _array(p_ids, "int32"),
                         _array(a_ids, "int32"), bool(finished), _array(t_ids, "int32", k),
                         _array(t_lp, "float16", k), _array(tail, "float32"), n, reasoning,
                         _array(r_ids, "int32"), _array(r_t_ids, "int32", r_k), _array(r_t_lp, "float16", r_k),
                         _array(r_tail, "float32"))

    def count(self, settings: str, split: str | None = None) -> int:
        if split:
            return self.db.execute("SELECT COUNT(*) FROM samples WHERE settings=? AND split=?",
                                   (settings, split)).fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM samples WHERE settings=?", (settings,)).fetchone()[0]


INSTRUCTIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS instructions (
  settings TEXT NOT NULL, request INTEGER NOT NULL, position INTEGER NOT NULL,
  instruction TEXT NOT NULL, input TEXT NOT NULL, lang TEXT NOT NULL, created_at REAL NOT NULL,
  PRIMARY KEY (settings, request, position));
CREATE TABLE IF NOT EXISTS bootstrap_requests (
  settings TEXT NOT NULL, request INTEGER NOT NULL, counts TEXT NOT NULL,  -- filter counts, JSON
  PRIMARY KEY (settings, request));
"""


class InstructionStore:
    """Self-Instruct's accepted instructions, one transaction per batch of teacher requests, so
    a rerun after a crash continues from the last finished batch with the same pool (the
    prompts of a batch are built from the pool as it was before the batch)."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self.db.executescript(INSTRUCTIONS_SCHEMA)

    def add_batch(self, settings: str, requests: list[tuple[int, list[tuple[str, str, str]], dict[str, int]]]) -> None:
        """requests: (request number, kept (instruction, input, lang) in acceptance order, filter
        counts: {outcome: n} and, per language, {outcome_lang: n} as TaskFilter.counts has them)."""
        with transaction(self.db):
            for request, kept, counts in requests:
                self.db.executemany("INSERT INTO instructions VALUES (?,?,?,?,?,?,?)",
                                    [(settings, request, i, ins, inp, lang, time.time())
                                     for i, (ins, inp, lang) in enumerate(kept)])
                self.db.execute("INSERT INTO bootstrap_requests VALUES (?,?,?)",
                                (settings, request, json.dumps(counts)))

    def instructions(self, settings: str) -> list[tuple[str, str, str]]:
        return list(self.db.execute("SELECT instruction, input, lang FROM instructions WHERE settings=? "
                                    "ORDER BY request, position", (settings,)))

    def requests_done(self, settings: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM bootstrap_requests WHERE settings=?", (settings,)).fetchone()[0]

    def counts(self, settings: str) -> dict[str, int]:
        """Every key summed over the requests; rows stored before the per-language keys existed
        only add to the totals."""
        total: dict[str, int] = {}
        for (counts,) in self.db.execute("SELECT counts FROM bootstrap_requests WHERE settings=?", (settings,)):
            for reason, n in json.loads(counts).items():
                total[reason] = total.get(reason, 0) + n
        return total


def load_distill_set(run: RunDir, split: str | None = None) -> list[Sample]:
    """The samples the generate stage chose for this run (optionally one split), from the store."""
    if not run.distill_set_path.is_file():
        raise UserError(f"{run.distill_set_path}: no distill set yet — run the generate stage first")
    manifest = json.loads(run.distill_set_path.read_text(encoding="utf-8"))
    # "keys" lists the chosen answers (verified, n per prompt); manifests written before it hold
    # prompt ids only, each with its one answer.
    keys = set(manifest["keys"]) if "keys" in manifest else None
    ids = set(manifest["ids"])
    with SampleStore(run.store_path) as store:
        return [s for s in store.samples(manifest["settings"], split)
                if (s.key in keys if keys is not None else s.id in ids and s.sample == 0)]
