import numpy as np

from edgedistill.data.store import Sample, SampleStore


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


# The samples table as edgedistill wrote it before traces and n answers per prompt (commit fab01b8).
OLD_SCHEMA = """
CREATE TABLE samples (
  key TEXT PRIMARY KEY, id TEXT NOT NULL, settings TEXT NOT NULL,
  split TEXT NOT NULL, lang TEXT NOT NULL, source TEXT NOT NULL, teacher TEXT NOT NULL,
  messages TEXT NOT NULL,
  prompt_ids BLOB NOT NULL, answer_ids BLOB NOT NULL, finished INTEGER NOT NULL, k INTEGER NOT NULL,
  topk_ids BLOB, topk_logprobs BLOB, tail_logprobs BLOB, created_at REAL NOT NULL);
"""


def test_a_store_written_before_traces_loads_and_keeps_its_keys(tmp_path):
    import hashlib
    import json
    import sqlite3

    from edgedistill.data.store import load_distill_set
    from edgedistill.run import RunDir

    old = _sample(0)
    db = sqlite3.connect(tmp_path / "distill.db")
    db.executescript(OLD_SCHEMA)
    key = hashlib.sha256(f"S\0{old.id}".encode()).hexdigest()[:32]  # the key formula of that release
    db.execute("INSERT INTO samples VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", (
        key, old.id, "S", old.split, old.lang, old.source, old.teacher, json.dumps(old.messages),
        old.prompt_ids.tobytes(), old.answer_ids.tobytes(), 1, 4, old.topk_ids.tobytes(),
        old.topk_logprobs.tobytes(), old.tail_logprobs.tobytes(), 0.0))
    db.commit()
    db.close()
    (tmp_path / "distill_set.json").write_text(json.dumps({"settings": "S", "ids": [old.id]}))  # an old manifest
    with SampleStore(tmp_path / "distill.db") as store:
        assert store.stored_keys("S") == {old.id}
        assert store.add("S", [old]) == 0  # the same key: a resumed run does not ask again
        second = _sample(0)
        second.sample, second.reasoning, second.reasoning_ids = 1, "考える", np.arange(3, dtype=np.int32)
        assert store.add("S", [second]) == 1 and store.stored_keys("S") == {old.id, f"{old.id}#1"}
    [back] = load_distill_set(RunDir(tmp_path))  # the old manifest names prompts: their first answer
    assert back.sample == 0 and back.reasoning is None and back.reasoning_ids is None
    assert np.array_equal(back.topk_ids, old.topk_ids) and back.answer == "答え"


def test_traces_round_trip_with_their_own_targets(tmp_path):
    s = _sample(1, k=4)
    s.reasoning, s.sample = "二と三で五。", 2
    s.reasoning_ids = np.arange(6, dtype=np.int32)
    s.reasoning_topk_ids = np.arange(12, dtype=np.int32).reshape(6, 2)
    s.reasoning_topk_logprobs = np.full((6, 2), -0.5, dtype=np.float16)
    s.reasoning_tail_logprobs = np.full(6, -1.0, dtype=np.float32)
    with SampleStore(tmp_path / "d.db") as store:
        store.add("S", [s])
        (back,) = store.samples("S")
    assert back.reasoning == s.reasoning and back.sample == 2 and back.key == f"{s.id}#2"
    for name in ("reasoning_ids", "reasoning_topk_ids", "reasoning_topk_logprobs", "reasoning_tail_logprobs"):
        x, y = getattr(s, name), getattr(back, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name
