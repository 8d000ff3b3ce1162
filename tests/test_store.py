import numpy as np
import pytest

from edgedistill.data.store import InstructionStore, Sample, SampleStore, sample_key


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
        k, messages = store.db.execute("SELECT k, messages FROM samples").fetchone()
    assert back.topk_ids is None and back.tail_logprobs is None
    assert k == 0 and "質問0" in messages  # no sparse target: k = 0; Japanese stored as text, not \u escapes


def test_the_store_is_opened_in_autocommit_wal_mode_and_waits_30_s_for_a_lock(tmp_path):
    # transaction() relies on autocommit (isolation_level None); WAL + synchronous NORMAL survive
    # a killed process; a second writer (another stage) waits up to 30 s instead of failing.
    with SampleStore(tmp_path / "d.db") as store:
        pragma = lambda name: store.db.execute(f"PRAGMA {name}").fetchone()[0]  # noqa: E731
        assert store.path == tmp_path / "d.db" and store.db.isolation_level is None
        assert (pragma("journal_mode"), pragma("synchronous"), pragma("busy_timeout")) == ("wal", 1, 30_000)


def test_a_failed_batch_stores_nothing(tmp_path):
    good, bad = _sample(1), _sample(2)
    bad.answer_ids = None  # violates NOT NULL: fails inside the INSERT, after `good` went in
    with SampleStore(tmp_path / "d.db") as store:
        import sqlite3

        with pytest.raises(sqlite3.IntegrityError, match="NOT NULL constraint failed: samples.answer_ids"):
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


def test_rows_are_read_per_settings_and_split_in_id_order(tmp_path):
    a, b, c = _sample(2), _sample(0), _sample(1)
    b.split, c.finished = "heldout", False
    with SampleStore(tmp_path / "d.db") as store:
        assert store.add("S", [a, b, c]) == 3
        assert store.add("T", [a]) == 1  # the same prompt under other settings is another row
        assert [s.id for s in store.samples("S")] == ["p0", "p1", "p2"]
        assert [s.id for s in store.samples("S", "train")] == ["p1", "p2"]
        assert [s.id for s in store.samples("S", "heldout")] == ["p0"]
        assert (store.count("S"), store.count("S", "train"), store.count("S", "heldout")) == (3, 2, 1)
        assert (store.count("T"), store.count("T", "heldout")) == (1, 0)
        assert (store.stored_ids("S"), store.stored_ids("T"), store.stored_ids("U")) == ({"p0", "p1", "p2"}, {"p2"}, set())
        (held,) = store.samples("S", "heldout")
        assert (held.split, held.lang, held.source, held.teacher, held.finished) == ("heldout", "ja", "s", "t", True)
        assert [s.finished for s in store.samples("S", "train")] == [False, True]


def test_arrays_are_stored_as_little_endian_bytes_six_k_plus_four_per_token(tmp_path):
    s = _sample(3, k=5)  # 6 answer tokens
    big = {name: getattr(s, name).astype(getattr(s, name).dtype.newbyteorder(">"))
           for name in ("prompt_ids", "answer_ids", "topk_ids", "topk_logprobs", "tail_logprobs")}
    for name, array in big.items():
        setattr(s, name, array)  # big-endian in memory: stored little-endian all the same
    with SampleStore(tmp_path / "d.db") as store:
        store.add("S", [s])
        row = store.db.execute("SELECT k, answer_ids, topk_ids, topk_logprobs, tail_logprobs FROM samples").fetchone()
        (back,) = store.samples("S")
    k, answer, ids, logprobs, tail = row
    assert k == 5 and answer == big["answer_ids"].astype("<i4").tobytes() and ids == big["topk_ids"].astype("<i4").tobytes()
    assert logprobs == big["topk_logprobs"].astype("<f2").tobytes() and tail == big["tail_logprobs"].astype("<f4").tobytes()
    assert len(ids) + len(logprobs) + len(tail) == 6 * (6 * 5 + 4)
    assert back.topk_ids.shape == (6, 5) and back.tail_logprobs.shape == (6,) and back.topk_logprobs.dtype == np.float16
    assert np.array_equal(back.topk_logprobs, big["topk_logprobs"]) and np.array_equal(back.prompt_ids, big["prompt_ids"])


def test_a_row_key_is_stable():
    # The key of every stored row: a change would orphan the answers already paid for.
    assert sample_key("S", "p0") == "1f696658a26559c0452b1db847be4ce9"  # sha256("S\\0p0")[:32]


def test_the_distill_set_is_the_manifests_ids_under_its_settings(tmp_path):
    import json

    from edgedistill.data.store import load_distill_set
    from edgedistill.errors import UserError
    from edgedistill.run import RunDir

    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    with pytest.raises(UserError, match=r"^.*distill_set\.json: no distill set yet — run the generate stage first$"):
        load_distill_set(run)
    samples = [_sample(i) for i in range(4)]
    samples[3].split = "heldout"
    with SampleStore(run.store_path) as store:
        store.add("S", samples)
        store.add("T", [_sample(1)])
    run.distill_set_path.write_text(json.dumps({"settings": "S", "ids": ["p0", "p2", "p3"]}))
    assert [s.id for s in load_distill_set(run)] == ["p0", "p2", "p3"]
    assert [s.id for s in load_distill_set(run, split="train")] == ["p0", "p2"]
    assert [s.id for s in load_distill_set(run, split="heldout")] == ["p3"]
    # a manifest with "keys" (n answers per prompt, verified ones kept) selects answers, not prompts
    second = _sample(0)
    second.sample = 1
    with SampleStore(run.store_path) as store:
        store.add("S", [second])
    run.distill_set_path.write_text(json.dumps({"settings": "S", "ids": ["p0", "p2"], "keys": ["p0#1", "p2"]}))
    assert [(s.id, s.sample) for s in load_distill_set(run)] == [("p0", 1), ("p2", 0)]


def test_instructions_come_back_in_request_then_acceptance_order(tmp_path):
    with SampleStore(tmp_path / "d.db") as store:
        instructions = InstructionStore(store.db)
        instructions.add_batch("S", [(1, [("c", "x", "ja"), ("d", "", "en")], {"kept": 2})])
        instructions.add_batch("S", [(0, [("b", "", "en"), ("a", "", "en")], {"kept": 2, "blacklist": 1})])
        instructions.add_batch("T", [(0, [("z", "", "en")], {"kept": 1})])
        assert instructions.instructions("S") == [("b", "", "en"), ("a", "", "en"), ("c", "x", "ja"), ("d", "", "en")]
        assert instructions.counts("S") == {"kept": 4, "blacklist": 1} and instructions.counts("U") == {}
        assert (instructions.requests_done("S"), instructions.requests_done("T"), instructions.requests_done("U")) == (2, 1, 0)
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
