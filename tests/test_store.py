import numpy as np

from edgedistill.data.store import InstructionStore, Sample, SampleStore


def _sample(i: int, k: int = 4) -> Sample:
    rng = np.random.default_rng(i)
    t = 3 + i
    return Sample(id=f"p{i}", split="train", lang="ja", source="s", teacher="t",
                  messages=[{"role": "user", "content": f"質問{i}"}, {"role": "assistant", "content": "答え"}],
                  prompt_ids=np.arange(5, dtype=np.int32), answer_ids=rng.integers(0, 100, t).astype(np.int32),
                  finished=True, topk_ids=rng.integers(0, 100, (t, k)).astype(np.int32),
                  topk_logprobs=rng.normal(size=(t, k)).astype(np.float16),
                  tail_logprobs=rng.normal(size=t).astype(np.float32))


def test_round_trip_and_idempotent_inserts(tmp_path):
    written = [_sample(i) for i in range(3)]
    with SampleStore(tmp_path / "d.db") as store:
        assert store.add("S", written) == 3
        assert store.add("S", written[:2]) == 0  # same key: stored once
        assert store.count("S") == 3 and store.count("other") == 0
    with SampleStore(tmp_path / "d.db") as store:  # reopened: what was written is there
        read = list(store.samples("S"))
    for a, b in zip(written, read):
        assert a.messages == b.messages and a.answer == "答え"
        for name in ("prompt_ids", "answer_ids", "topk_ids", "topk_logprobs", "tail_logprobs"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and np.array_equal(x, y), name


def test_text_only_samples_have_no_arrays(tmp_path):
    s = _sample(0)
    s.topk_ids = s.topk_logprobs = s.tail_logprobs = None
    with SampleStore(tmp_path / "d.db") as store:
        store.add("S", [s])
        (back,) = store.samples("S")
    assert back.topk_ids is None and back.tail_logprobs is None


def test_a_failed_batch_stores_nothing(tmp_path):
    good, bad = _sample(1), _sample(2)
    bad.answer_ids = None  # violates NOT NULL: fails inside the INSERT, after `good` went in
    with SampleStore(tmp_path / "d.db") as store:
        import sqlite3

        import pytest
        with pytest.raises(sqlite3.IntegrityError):
            store.add("S", [good, bad])
        assert store.count("S") == 0


def test_filter_counts_sum_per_language_and_old_rows_stay_readable(tmp_path):
    with SampleStore(tmp_path / "d.db") as store:
        instructions = InstructionStore(store.db)
        old = {"kept": 2, "near_duplicate": 1}  # a row written before the per-language keys
        new = {"kept": 3, "kept_en": 1, "kept_ja": 2, "near_duplicate": 1, "near_duplicate_ja": 1}
        instructions.add_batch("S", [(0, [("a", "", "en"), ("b", "", "en")], old),
                                     (1, [("c", "", "en"), ("d", "", "ja"), ("e", "", "ja")], new)])
        instructions.add_batch("S", [(2, [], {"teacher_failed": 1})])
        assert instructions.counts("S") == {"kept": 5, "near_duplicate": 2, "kept_en": 1, "kept_ja": 2,
                                            "near_duplicate_ja": 1, "teacher_failed": 1}
        assert instructions.requests_done("S") == 3 and len(instructions.instructions("S")) == 5
