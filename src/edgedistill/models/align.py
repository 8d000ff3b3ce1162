"""Two tokenizations of one text, lined up: the facts cross-tokenizer distillation and its
evaluation share (ARCHITECTURE.md, "Tokenizers").

- `align_tokens`: the teacher's and the student's tokens of the same answer, grouped by UTF-8
  byte offsets. A group closes where both sides have a token boundary at the same offset, so
  each group is 1:1, 1:n, n:1 or n:m tokens spelling the same bytes. Special tokens (end of
  turn) spell no answer bytes and pair with each other as their own 1:1 group. At the start of
  every group both models predict "the next token at this byte offset" after the same bytes,
  so their distributions there are comparable; at a 1:1 group they also predict the same
  string, which is what the mapped KL needs.
- `vocab_map`: teacher id -> student id of the token spelling the same bytes (-1 = none), one
  array over the teacher's vocabulary, cached per (teacher, student) pair by both tokenizers'
  hashes. Ordinary tokens map to ordinary tokens by canonical bytes (byte-level `Ġ`,
  SentencePiece `▁` and `<0xNN>` normalised by models/vocab.py); special tokens map only to
  special tokens of the same text, and the teacher's end of turn to the student's.

GOLD (TRL, `trl/experimental/gold`) aligns by the same byte offsets and matches vocabularies
by exact strings; what we add on top is in distill/xtok.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgedistill.models.vocab import VocabMap

MAP_VERSION = 2  # part of the cache key: a map computed by an older rule is not reused


@dataclass(frozen=True)
class Group:
    """Teacher tokens [t0, t1) and student tokens [s0, s1) spelling the same `n_bytes` bytes."""

    t0: int
    t1: int
    s0: int
    s1: int
    n_bytes: int

    @property
    def one_to_one(self) -> bool:
        return self.t1 - self.t0 == 1 and self.s1 - self.s0 == 1


@dataclass(frozen=True)
class Alignment:
    """Groups in order, from the first token of each side. Where the two byte streams stop
    agreeing (a cut UTF-8 character at the length limit, a normaliser that rewrote the text)
    the alignment ends: tokens from `teacher_end` / `student_end` on are in no group."""

    groups: tuple[Group, ...]
    teacher_end: int
    student_end: int


def token_bytes(ids, vocab: VocabMap) -> list[bytes | None]:
    """The bytes each id spells; None for a special token (it spells no answer text)."""
    return [None if int(i) in vocab.special_ids else vocab.id_bytes.get(int(i), b"") for i in ids]


def align_tokens(teacher: list[bytes | None], student: list[bytes | None]) -> Alignment:
    """Group two token sequences (each token's bytes, None for a special token) by byte offsets.

    Args:
        teacher: bytes of the teacher's T tokens.
        student: bytes of the student's S tokens.
    Returns:
        The groups, each closing at the first byte offset where both sides end a token.
    """
    groups: list[Group] = []
    i = j = 0
    while i < len(teacher) and j < len(student):
        if teacher[i] is None or student[j] is None:
            if teacher[i] is None and student[j] is None:  # end of turn <-> end of turn
                groups.append(Group(i, i + 1, j, j + 1, 0))
                i, j = i + 1, j + 1
                continue
            break
        t0, s0 = i, j
        left, right = bytearray(teacher[i]), bytearray(student[j])
        i, j = i + 1, j + 1
        # A token that spells nothing (SentencePiece's lone '▁' prefix, a stray byte dropped)
        # joins the group of the bytes after it: a group closes on a shared boundary with bytes.
        while len(left) != len(right) or not left:
            more_teacher = i < len(teacher) and teacher[i] is not None
            more_student = j < len(student) and student[j] is not None
            if len(left) < len(right) or (len(left) == len(right) and more_teacher):
                if not more_teacher:
                    break
                left += teacher[i]
                i += 1
            else:
                if not more_student:
                    break
                right += student[j]
                j += 1
        if left != right:  # the streams disagree (or one side ran out): stop before this group
            i, j = t0, s0
            break
        groups.append(Group(t0, i, s0, j, len(left)))
    return Alignment(tuple(groups), i, j)


def valid_utf8(pieces: list[bytes | None]) -> tuple[list[bytes | None], list[bool]]:
    """Each token's bytes less those that are no part of a valid UTF-8 character of the whole
    text (a model can write stray bytes; a length limit cuts a character), and whether the
    token lost any. The kept bytes are the text the other tokenizer can be given; a group with
    a damaged token is aligned (so the groups after it still are) but compares nothing."""
    raw = b"".join(b for b in pieces if b is not None)
    keep = bytearray(len(raw))
    p = 0
    while p < len(raw):
        lead = raw[p]
        n = 1 if lead < 0x80 else 2 if 0xC2 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if 0xF0 <= lead < 0xF5 else 0
        try:
            if n and p + n <= len(raw) and raw[p:p + n].decode("utf-8"):
                keep[p:p + n] = b"\x01" * n
                p += n
                continue
        except UnicodeDecodeError:
            pass
        p += 1
    kept, damaged, offset = [], [], 0
    for piece in pieces:
        if piece is None:
            kept.append(None)
            damaged.append(False)
            continue
        mask = keep[offset:offset + len(piece)]
        kept.append(bytes(b for b, k in zip(piece, mask) if k))
        damaged.append(not all(mask))
        offset += len(piece)
    return kept, damaged


def strip_dummy_prefix(student: list[bytes | None], text: bytes) -> list[bytes | None]:
    """SentencePiece tokenizers of the Llama 2 layout prepend `▁` to the text they encode: the
    student's first token then spells one space the teacher's text does not have. It belongs
    to no answer byte, so it is dropped from that token's bytes."""
    first = next((k for k, b in enumerate(student) if b is not None), None)
    if first is None or text.startswith(b" ") or not student[first].startswith(b" "):
        return student
    return student[:first] + [student[first][1:]] + student[first + 1:]


def tokenizer_hash(tokenizer) -> str:
    """Identity of a vocabulary: its token -> id table and which tokens are special."""
    special = sorted(set(getattr(tokenizer, "all_special_tokens", [])) | set(tokenizer.get_added_vocab()))
    payload = json.dumps([sorted(tokenizer.get_vocab().items()), special, tokenizer.eos_token], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def vocab_map(teacher: VocabMap, student: VocabMap, teacher_eos: int | None = None,
              student_eos: int | None = None) -> np.ndarray:
    """(V_teacher,) int64: the student id spelling each teacher token's bytes, -1 where none.

    When several student ids spell the same bytes, an ordinary piece wins over a byte-fallback
    `<0xNN>` piece (Gemma has both '.' and <0x2E>: its tokenizer writes '.', and its model gives
    <0x2E> ~e^-47 — measured in bench/xtok.py before this rule), then the lowest id.
    Injective: when two teacher ids spell the same bytes, the lowest keeps the student id and
    the others map to -1, so a student id never stands for two teacher buckets."""
    ordinary = {}
    for idx in sorted(student.id_bytes, key=lambda i: (i in student.byte_fallback_ids, i)):
        if idx not in student.special_ids:
            ordinary.setdefault(student.id_bytes[idx], idx)
    special = {student.id_bytes[idx]: idx for idx in sorted(student.special_ids, reverse=True)}
    size = max(teacher.id_bytes, default=-1) + 1
    out = np.full(size, -1, dtype=np.int64)
    taken: set[int] = set()
    for idx in sorted(teacher.id_bytes):
        raw = teacher.id_bytes[idx]
        target = special.get(raw) if idx in teacher.special_ids else ordinary.get(raw)
        if idx == teacher_eos and student_eos is not None:
            target = student_eos
        if target is not None and target not in taken:
            out[idx] = target
            taken.add(target)
    if teacher_eos is not None and student_eos is not None and 0 <= teacher_eos < size:
        stolen = np.flatnonzero(out == student_eos)  # the end-of-turn pair wins over a same-text special
        out[stolen] = -1
        out[teacher_eos] = student_eos
    return out


def cached_vocab_map(teacher_tokenizer, student_tokenizer, folder: Path) -> np.ndarray:
    """`vocab_map` of the two tokenizers, computed once and kept in `folder` as .npy, keyed by
    both tokenizers' hashes (a changed tokenizer gets a new file)."""
    key = f"{tokenizer_hash(teacher_tokenizer)[:16]}-{tokenizer_hash(student_tokenizer)[:16]}"
    path = folder / f"vocab-map-{MAP_VERSION}-{key}.npy"
    if path.is_file():
        return np.load(path)
    mapping = vocab_map(VocabMap(teacher_tokenizer), VocabMap(student_tokenizer), teacher_tokenizer.eos_token_id,
                        student_tokenizer.eos_token_id)
    folder.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=folder, suffix=".npy")
    with os.fdopen(handle, "wb") as f:
        np.save(f, mapping)
    os.replace(tmp, path)
    return mapping
