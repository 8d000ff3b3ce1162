"""Vocabularies: the bytes each token id stands for, so that ids from a server, a GGUF file or
another tokenizer can be matched by what they spell rather than by how they are written.

Two layouts are read: GPT-2 style byte-level BPE (SmolLM2, Qwen, Llama 3, gpt-oss: each byte
written as a printable stand-in character, transformers' `bytes_to_unicode`) and
SentencePiece style (Llama 2, Mistral, Gemma: `▁` for a space, `<0xNN>` byte-fallback pieces).
Special tokens stand for their own text.
"""

from __future__ import annotations

from functools import cache


@cache
def _byte_level_table() -> dict[str, int]:
    """GPT-2 byte-level BPE's printable stand-in character for each byte, reversed."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def _sentencepiece_bytes(token: str) -> bytes:
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return bytes([int(token[3:5], 16)])
    return token.replace("\u2581", " ").encode("utf-8")


class VocabMap:
    """Token bytes <-> ids of a local tokenizer (byte-level BPE or SentencePiece layouts)."""

    def __init__(self, tokenizer):
        vocab: dict[str, int] = tokenizer.get_vocab()
        special = set(getattr(tokenizer, "all_special_tokens", [])) | set(tokenizer.get_added_vocab())
        table = _byte_level_table()
        ordinary = [t for t in vocab if t not in special]
        byte_level = bool(ordinary) and all(ch in table for t in ordinary for ch in t)
        self.id_bytes: dict[int, bytes] = {}
        self.special_ids = {vocab[t] for t in special if t in vocab}
        # SentencePiece's <0xNN> pieces: the tokenizer writes them only for bytes no piece covers.
        self.byte_fallback_ids: set[int] = set()
        for token, idx in vocab.items():
            if token in special:
                raw = token.encode("utf-8")
            elif byte_level:
                raw = bytes(table[ch] for ch in token)
            else:
                raw = _sentencepiece_bytes(token)
                if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                    self.byte_fallback_ids.add(idx)
            self.id_bytes[idx] = raw
        self.by_bytes: dict[bytes, int] = {}
        for idx in sorted(self.id_bytes):  # the lowest id wins a (rare) byte collision
            self.by_bytes.setdefault(self.id_bytes[idx], idx)
        self.longest = max(map(len, self.by_bytes), default=0)

    def split(self, raw: bytes) -> list[int] | None:
        """Ids spelling `raw` exactly, longest token first (None if some byte has no token)."""
        ids, start = [], 0
        while start < len(raw):
            for end in range(min(len(raw), start + self.longest), start, -1):
                if (idx := self.by_bytes.get(raw[start:end])) is not None:
                    ids.append(idx)
                    start = end
                    break
            else:
                return None
        return ids

    def lookup(self, entry: dict, chosen: bool = False) -> int | None:
        """The local id of one logprobs entry, or None when it does not belong to this vocabulary.

        With a server id (llama.cpp) the id must agree with the entry's bytes, allowing for two
        llama.cpp habits measured on its server: special tokens come back with empty bytes, and
        a chosen token that completes a UTF-8 character carries the bytes of the pieces before
        it (its alternatives carry their own bytes only)."""
        raw = bytes(entry["bytes"]) if isinstance(entry.get("bytes"), list) else str(entry.get("token", "")).encode()
        server_id = entry.get("id")
        if isinstance(server_id, int) and not isinstance(server_id, bool):
            own = self.id_bytes.get(server_id)
            if own is not None and (raw == own or (chosen and own and raw.endswith(own))
                                    or (not raw and server_id in self.special_ids)):
                return server_id
            return None
        return self.by_bytes.get(raw)


def vocab_matches(teacher_tokenizer, student_tokenizer) -> bool:
    """Logit KD on stored ids needs the same token strings at the same ids (padding rows of the
    embedding beyond the tokenizer do not count)."""
    return teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab()
